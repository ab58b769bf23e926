"""Read job-ad tables (CSV/TSV, JSONL, Parquet) with every column as strings, and clear errors.

``read_table(path)`` returns a DataFrame whose cells are all ``str`` (missing values ``""``, the text "NA"
stays "NA"), plus what later checks need in ``attrs`` (pandas copies ``attrs`` into derived frames and Parquet
writes them into its metadata, so callers take what they need and clear them before deriving or writing):

- ``attrs["source_rows"]``: int64 array, the row number a user sees in the file for each row (CSV: the header
  is row 1; JSONL: the line; Parquet: 1-based), so every later message can name the row;
- ``attrs["non_string"]``: column -> first row number whose value was not text (a number, a list) in a
  typed format (JSONL, Parquet), so ``prepare`` can refuse to embed ``0`` and ``1`` as ads;
- ``attrs["delimiter"]``: the separator a CSV file was read with (``,``; ``;`` or tab when detected).
"""

from __future__ import annotations

import codecs
import csv
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
_CSV_CHUNK = 50_000  # rows parsed at a time


def read_table(path: Path, *, what: str = "--input") -> pd.DataFrame:
    """Read a CSV/TSV, JSONL or Parquet file with every column as strings.

    Args:
        path: ``.csv``/``.tsv`` (UTF-8, header row), ``.jsonl``/``.ndjson`` (one JSON object per line) or
            ``.parquet``/``.pq``; the suffix decides the format. A ``.csv`` whose header has no comma but
            semicolons or tabs is read with that separator (spreadsheet exports in Danish/Polish locales).
        what: how messages name the file (``--input``, ``--labels file``).

    Returns:
        A frame whose columns are all strings; missing values are ``""`` (the text ``"NA"`` stays
        ``"NA"``). ``frame.attrs["source_rows"]`` holds each row's number as a user sees it in the file:
        for CSV the header is row 1 and the first ad row 2 (as in a spreadsheet), for JSONL the line
        number, for Parquet the 1-based row position.

    Raises:
        DataError: unknown suffix, missing file, no rows, bytes that are not UTF-8 (naming the line and
            byte offset of the first bad byte), a JSONL line that is not a JSON object, an unparsable CSV,
            two columns with the same name.
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
            f"{what} file not found" if not path.exists() else f"{what} is not a file",
            where=str(path),
            fix=f"check the path (relative paths start at {Path.cwd()}) and pass an existing {what} file",
        )
    non_string: dict[str, int] = {}
    delimiter = None
    if suffix in PARQUET_SUFFIXES:
        frame, non_string = _read_parquet(path)
        rows = np.arange(1, len(frame) + 1)
    elif suffix in JSONL_SUFFIXES:
        frame, rows, non_string = _read_jsonl(path, _decode_utf8(path, path.read_bytes()))
    else:
        # CSV: check the bytes in chunks and let pandas read the file itself, so a 1 GB export never sits in
        # memory as one Python string (nor as a StringIO copy of it).
        _check_utf8(path)
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = f.readline()
        delimiter = _delimiter(header, CSV_SUFFIXES[suffix])
        frame = _read_csv(path, header, delimiter)
        rows = np.arange(2, len(frame) + 2)
    if len(frame) == 0:
        raise DataError("no rows", where=str(path), found="an empty table", fix=f"pass an {what} file that has ads")
    frame.attrs["source_rows"] = np.asarray(rows, dtype=np.int64)
    frame.attrs["non_string"] = non_string
    frame.attrs["delimiter"] = delimiter
    return frame


def _delimiter(header: str, default: str) -> str:
    """The separator of a delimited file: ``default`` unless the header has none of it but ``;`` or tab."""
    if default in header:
        return default
    for candidate in (";", "\t", "|"):
        if candidate in header:
            return candidate
    return default


def _check_unique_columns(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(
                f"column name {name!r} appears twice in the header (column {i} repeats it)",
                where=str(path),
                fix="rename one of the two columns so every column name is unique",
            )
        seen.add(name)


def _check_utf8(path: Path, chunk: int = 1 << 22) -> None:
    """Raise ``_utf8_error`` at the first byte that is not UTF-8, reading the file in chunks."""
    pos, carry = 0, b""  # pos: file offset of carry[0]
    with open(path, "rb") as f:
        while block := f.read(chunk):
            data = carry + block
            try:
                data.decode("utf-8")
                pos, carry = pos + len(data), b""
            except UnicodeDecodeError as e:
                if e.reason != "unexpected end of data":
                    _utf8_error(path, pos + e.start)
                pos, carry = pos + e.start, data[e.start :]  # a character cut by the chunk boundary
    if carry:
        _utf8_error(path, pos)


def _utf8_error(path: Path, offset: int) -> None:
    with open(path, "rb") as f:
        data = f.read(offset + 1)
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    raise DataError(
        f"not valid UTF-8: byte 0x{data[offset]:02x} on line {line}, column {column} (byte offset {offset})",
        where=str(path),
        fix="re-save the file as UTF-8, e.g. "
        f"`iconv -f cp1250 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`"
        " (cp1250 for Polish Windows files, cp1252/latin-1 for Danish)",
    )


def _decode_utf8(path: Path, data: bytes) -> str:
    """Decode UTF-8 (with or without BOM) ourselves so the error can name the line of the first bad byte."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        _utf8_error(path, start + e.start)
        raise  # unreachable: _utf8_error raises


def _read_csv(path: Path, header: str, sep: str) -> pd.DataFrame:
    if path.stat().st_size == 0 or not header.strip():
        raise DataError("no rows", where=str(path), found="an empty file", fix="pass an --input file that has ads")
    kind = {",": "CSV", "\t": "tab-separated", ";": "semicolon-separated"}.get(sep, f"{sep!r}-separated")
    try:
        names = next(csv.reader([header.rstrip("\r\n")], delimiter=sep), [])
        _check_unique_columns(path, [h.strip() for h in names])
        # In chunks: the parser makes Python strings before they become compact string arrays, and a whole
        # portal's export at once would hold every ad twice over (a 550 MB file peaked at 3.1 GB, chunked 1.3 GB).
        chunks = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            chunksize=_CSV_CHUNK,
        )
        return pd.concat(list(chunks), ignore_index=True)
    except pd.errors.EmptyDataError:
        raise DataError(
            "no rows", where=str(path), found="an empty file", fix="pass an --input file that has ads"
        ) from None
    except (pd.errors.ParserError, ValueError, csv.Error) as e:
        raise DataError(
            f"not a valid {kind} file ({' '.join(str(e).split())})",
            where=str(path),
            fix=f"the file was read as {kind}: check the separator and the quoting around texts with "
            f"{sep!r} or line breaks (re-export with every field quoted)",
        ) from None


def _read_jsonl(path: Path, text: str) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=lambda pairs, n=number: _unique_keys(path, pairs, n))
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
    rows = np.asarray(lines, dtype=np.int64)
    return _all_strings(frame), rows, _non_string(frame, rows)


def _unique_keys(path: Path, pairs: list[tuple[str, Any]], line: int) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise DataError(
            f"line {line} has the key {dup!r} twice", where=str(path), fix="give every field of an object its own name"
        )
    return dict(pairs)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    try:
        import pyarrow.parquet as pq

        names = list(pq.read_schema(path).names)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"cannot read Parquet ({type(e).__name__}: {e})", where=str(path), fix="re-export the file as Parquet"
        ) from None
    _check_unique_columns(path, [n for n in names if not n.startswith("__index_level_")])
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"cannot read Parquet ({type(e).__name__}: {e})", where=str(path), fix="re-export the file as Parquet"
        ) from None
    frame = frame.reset_index(drop=True)
    return _all_strings(frame), _non_string(frame, np.arange(1, len(frame) + 1))


def _non_string(frame: pd.DataFrame, rows: np.ndarray) -> dict[str, int]:
    """column -> row number of its first value that is present but not text (numbers, lists, booleans)."""
    out: dict[str, int] = {}
    for col in frame.columns:
        s = frame[col]
        if isinstance(s.dtype, pd.StringDtype):
            continue
        values = s.astype(object).to_numpy()
        for i, v in enumerate(values):
            if isinstance(v, str) or v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
                continue
            out[str(col)] = int(rows[i])
            break
    return out


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
