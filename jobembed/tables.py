"""Read job-ad tables (CSV/TSV, JSONL, Parquet) with every column as strings, and clear errors.

``read_table(path)`` returns a DataFrame whose cells are all ``str`` (missing values ``""``, the text "NA"
stays "NA") and whose ``attrs["source_rows"]`` holds the row number a user sees in the file (CSV: the
header is row 1; JSONL: the line; Parquet: 1-based), so every later message can name the row.
"""

from __future__ import annotations

import codecs
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobembed.errors import DataError

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ACCEPTED_SUFFIXES = (*CSV_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV, JSONL or Parquet file with every column as strings.

    Args:
        path: ``.csv``/``.tsv`` (UTF-8, header row), ``.jsonl``/``.ndjson`` (one JSON object per line) or
            ``.parquet``/``.pq``; the suffix decides the format.

    Returns:
        A frame whose columns are all strings; missing values are ``""`` (the text ``"NA"`` stays
        ``"NA"``). ``frame.attrs["source_rows"]`` holds each row's number as a user sees it in the file:
        for CSV the header is row 1 and the first ad row 2 (as in a spreadsheet), for JSONL the line
        number, for Parquet the 1-based row position.

    Raises:
        DataError: unknown suffix, missing file, no rows, bytes that are not UTF-8 (naming the line and
            byte offset of the first bad byte), a JSONL line that is not a JSON object, an unparsable CSV.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise DataError(
            f"cannot read '{suffix or '(no suffix)'}' files",
            where=str(path),
            expected="one of " + ", ".join(ACCEPTED_SUFFIXES),
            fix="convert the file to CSV, JSONL or Parquet (the suffix picks the reader)",
        )
    if not path.is_file():
        raise DataError(
            "file not found" if not path.exists() else "not a file",
            where=str(path),
            fix="check the path (relative paths start at the current folder) or pass an existing INPUT file",
        )
    if suffix in PARQUET_SUFFIXES:
        frame = _read_parquet(path)
        rows = np.arange(1, len(frame) + 1)
    else:
        text = _decode_utf8(path, path.read_bytes())
        if suffix in JSONL_SUFFIXES:
            frame, rows = _read_jsonl(path, text)
        else:
            frame = _read_csv(path, text, CSV_SUFFIXES[suffix])
            rows = np.arange(2, len(frame) + 2)
    if len(frame) == 0:
        raise DataError("no rows", where=str(path), found="an empty table", fix="pass an INPUT file that has ads")
    frame.attrs["source_rows"] = rows
    return frame


def _decode_utf8(path: Path, data: bytes) -> str:
    """Decode UTF-8 (with or without BOM) ourselves so the error can name the line of the first bad byte."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise DataError(
            f"not valid UTF-8: byte 0x{data[offset]:02x} on line {line}, column {column} (byte offset {offset})",
            where=str(path),
            fix="re-save the file as UTF-8, e.g. "
            f"`iconv -f cp1250 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`"
            " (cp1250 for Polish Windows files, cp1252/latin-1 for Danish)",
        ) from None


def _read_csv(path: Path, text: str, sep: str) -> pd.DataFrame:
    if not text.strip():
        raise DataError("no rows", where=str(path), found="an empty file", fix="pass an INPUT file that has ads")
    try:
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            "no rows", where=str(path), found="an empty file", fix="pass an INPUT file that has ads"
        ) from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(
            f"not a valid {'TSV' if sep == chr(9) else 'CSV'} file ({str(e).strip()})",
            where=str(path),
            fix="check quoting around texts with commas or line breaks (re-export with quoting of all fields)",
        ) from None


def _read_jsonl(path: Path, text: str) -> tuple[pd.DataFrame, np.ndarray]:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"line {number} is not valid JSON ({e.msg} at column {e.colno})",
                where=str(path),
                fix="write one JSON object per line (JSON Lines); a pretty-printed JSON array is not JSONL",
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"line {number} is a JSON {type(obj).__name__}, not an object",
                where=str(path),
                fix='write one object per line, e.g. {"text": "...", "label": "..."}',
            )
        records.append(obj)
        lines.append(number)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    return _all_strings(frame), np.asarray(lines, dtype=np.int64)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"cannot read Parquet ({type(e).__name__}: {e})", where=str(path), fix="re-export the file as Parquet"
        ) from None
    return _all_strings(frame.reset_index(drop=True))


def _as_str(value: Any) -> str:
    """One cell as text: missing -> "", JSON values as JSON would write them, numbers as Python prints them."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple | np.ndarray):
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value, ensure_ascii=False, default=str)
    if isinstance(value, float | np.floating) and np.isnan(value):
        return ""
    if value is pd.NA or value is pd.NaT:
        return ""
    return str(value)


def _all_strings(frame: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for col in frame.columns:
        s = frame[col]
        if isinstance(s.dtype, pd.StringDtype):
            out[str(col)] = s.fillna("").astype(str)
        else:
            out[str(col)] = s.astype(object).map(_as_str).astype(str)
    return pd.DataFrame(out, index=frame.index)
