"""The ``prepare`` stage: read a table of job ads, validate it, remove duplicates, group reposts, split.

Data contract of the outputs (``out_dir`` is normally ``<run>/prepare``):

- ``train.parquet``, ``val.parquet``, ``test.parquet``: one row per ad with columns ``id`` (str, unique
  across all splits), ``text`` (str, the ad as given), ``label`` (str, stripped; ``"7.0"`` becomes ``"7"``),
  ``group`` (int64, ads in one group are reposts of each other and always sit in one split), then every
  other column of the input as strings (missing values as ``""``). ``val`` may have no rows.
- ``labels.json``: ``[{"label", "name", "description"}, ...]`` for every class a model may predict: the
  whole label set when one is given (also labels without ads), else the observed labels.
- ``data_card.json``: what happened to every row (see ``prepare``), ``config.yaml``: the resolved config.

Nothing here prints; the CLI prints ``data_card_table(card)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from jobembed.artifacts import atomic_write_bytes, file_sha256, read_json, write_json
from jobembed.config import write_resolved
from jobembed.dedup import near_duplicate_groups, normalise_for_dedup
from jobembed.errors import ConfigError, DataError
from jobembed.sections import LabelSetConfig, PrepareConfig
from jobembed.tables import read_table

SPLITS = ("train", "val", "test")
CORE_COLUMNS = ("id", "text", "label", "group")
# How many example row numbers a message or the data card lists.
EXAMPLES = 5


@dataclass
class PrepareResult:
    """What ``prepare`` wrote: the folder, the data card (also in ``data_card.json``) and the split files."""

    out_dir: Path
    card: dict[str, Any]
    splits: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ label sets


_INTEGRAL_FLOAT = re.compile(r"^([+-]?\d+)\.0+$")


def normalise_label(value: str) -> str:
    """Strip whitespace; ``"7.0"`` (a float column's way to write 7) becomes ``"7"``."""
    value = str(value).strip()
    m = _INTEGRAL_FLOAT.match(value)
    return m.group(1) if m else value


def _label_sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _describe_filter(flt: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in flt.items())


def load_label_set(cfg: LabelSetConfig) -> pd.DataFrame:
    """Read the list of allowed labels (with names/descriptions for zero-shot) from a table.

    Args:
        cfg: the file, its code/name/description columns and an optional ``filter`` (``column == value``
            for every item; one file may hold several levels of a hierarchy).

    Returns:
        Columns ``label`` (str, normalised like the data labels), ``name`` (str; the label itself when the
        name column is unset or empty) and ``description`` (str, ``""`` when unset), in file order.

    Raises:
        DataError: a missing column, a filter that keeps no rows, an empty or duplicate code.
    """
    table = read_table(cfg.path, what="--labels (prepare.labels.path)")
    where = str(cfg.path)
    found = "columns " + ", ".join(table.columns)
    wanted = {"filter": list(cfg.filter), "code_col": [cfg.code_col]}
    if cfg.name_col:
        wanted["name_col"] = [cfg.name_col]
    if cfg.description_col:
        wanted["description_col"] = [cfg.description_col]
    for setting, cols in wanted.items():
        for col in cols:
            if col not in table.columns:
                raise DataError(
                    f"label-set column '{col}' (labels.{setting}) not found",
                    where=where,
                    found=found,
                    fix=f"set labels.{setting} to one of the columns above",
                )
    rows = np.asarray(table.attrs["source_rows"])
    table.attrs = {}
    keep = np.ones(len(table), dtype=bool)
    for col, value in cfg.filter.items():
        keep &= (table[col].str.strip() == str(value).strip()).to_numpy()
    if not keep.any():
        col, value = next(iter(cfg.filter.items()))
        values = sorted(set(table[col]))[:10]
        raise DataError(
            f"the filter {_describe_filter(cfg.filter)} keeps no label rows",
            where=where,
            found=f"values of '{col}': " + ", ".join(repr(v) for v in values),
            fix="use one of those values in labels.filter",
        )
    table, rows = table[keep], rows[keep]
    labels = table[cfg.code_col].map(normalise_label)
    empty = (labels == "").to_numpy()
    if empty.any():
        raise DataError(
            f"{int(empty.sum())} label rows have an empty code in '{cfg.code_col}' ({_rows_text(rows[empty])})",
            where=where,
            fix="fill in the codes, or use a column that is always filled (e.g. the name) as labels.code_col",
        )
    dup = labels.duplicated(keep=False).to_numpy()
    if dup.any():
        first = labels[dup].iloc[0]
        raise DataError(
            f"label '{first}' is listed more than once ({_rows_text(rows[(labels == first).to_numpy()])})",
            where=where,
            fix="keep one row per code, or add a labels.filter (e.g. level) that selects one level",
        )
    names = table[cfg.name_col].str.strip() if cfg.name_col else labels
    names = names.where(names != "", labels)
    descriptions = table[cfg.description_col].str.strip() if cfg.description_col else pd.Series("", index=table.index)
    return pd.DataFrame(
        {"label": labels.to_numpy(), "name": names.to_numpy(), "description": descriptions.to_numpy()}
    ).astype(str)


# ----------------------------------------------------------------------------------------------- helpers


def _rows_text(rows: Any, limit: int = EXAMPLES) -> str:
    rows = [int(r) for r in rows]
    head = ", ".join(str(r) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {head}{more}"


def _examples(rows: Any) -> list[int]:
    return [int(r) for r in list(rows)[:EXAMPLES]]


def _length_stats(texts: pd.Series) -> dict[str, float]:
    if len(texts) == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0}
    lengths = texts.str.len().to_numpy(dtype=float)
    return {
        "mean": round(float(lengths.mean()), 1),
        "median": round(float(np.median(lengths)), 1),
        "p95": round(float(np.percentile(lengths, 95)), 1),
        "max": int(lengths.max()),
    }


# ------------------------------------------------------------------------------------------------ prepare


def prepare(*, config: PrepareConfig, out_dir: Path, progress: bool = True) -> PrepareResult:
    """Read, validate, dedupe, group reposts and split one table of labelled job ads.

    Steps, each recorded in ``data_card.json``:

    1. Read ``config.input`` (``read_table``); check that the text/label/id columns exist.
    2. Ids: ``id_col`` values (stripped); rows without one, or all rows when ``id_col`` is None, get
       ``row-<n>`` (``n`` = the row number in the file). Duplicate ids are an error.
    3. Drop rows with empty/whitespace text or no label (counted, with example row numbers); labels are
       stripped and ``"7.0"`` becomes ``"7"``. If nothing is left, error.
    4. With a label set: every data label must be in it (else error); set labels without ads are kept in
       ``labels.json`` and listed as ``labels_without_data``.
    5. Exact duplicates (same text) and normalised duplicates (same ``normalise_for_dedup`` key) keep
       one row per group; groups whose rows disagree on the label follow ``conflict_policy``.
    6. Near-duplicates (TF-IDF cosine ≥ ``near_duplicate_threshold``) are kept but share a ``group``.
    7. Classes with fewer than ``min_class_count`` ads follow ``rare_policy`` (error/drop/merge).
    8. ``max_rows``: a seeded subsample of whole groups, stratified by label.
    9. Split with ``StratifiedGroupKFold``: one fold of ``round(1/test_size)`` is test, then one fold of
       ``round((1-test_size)/val_size)`` of the rest is val (none when ``val_size`` is 0).

    Args:
        config: the stage config; ``config.input`` must be set.
        out_dir: folder for the outputs (created); the run manifest goes to ``out_dir.parent``.
        progress: show a progress bar over the near-duplicate chunks.

    Returns:
        The output folder, the data card and the paths of the three split files.

    Raises:
        ConfigError: no input file configured.
        DataError: any input problem named above, with the rows concerned and the fix.
    """
    if config.input is None:
        raise ConfigError(
            "prepare needs an input file", fix="pass --input FILE (CSV, JSONL or Parquet) or set prepare.input"
        )
    path = Path(config.input)
    raw = read_table(path, what="--input (prepare.input)")
    _release_freed_memory()
    sha256 = file_sha256(path)
    _check_columns(raw, config, path)
    read_info, raw.attrs = dict(raw.attrs), {}  # pandas would copy attrs into every frame derived from raw
    source_rows = np.asarray(read_info["source_rows"], dtype=np.int64)
    if config.text_col in read_info.get("non_string", {}):
        raise DataError(
            f"column '{config.text_col}' holds values that are not text "
            f"(row {read_info['non_string'][config.text_col]})",
            where=str(path),
            fix="pass --text-col with the column that holds the ad texts (numbers are not ads)",
        )

    work = pd.DataFrame(
        {
            "_row": source_rows,
            "id": _make_ids(raw, config, path, source_rows),
            "text": raw[config.text_col].astype(str),
            "label": raw[config.label_col].map(normalise_label).astype(str),
        },
        index=raw.index,
    )
    card: dict[str, Any] = {
        "input": str(path),
        "input_sha256": sha256,
        "delimiter": read_info.get("delimiter"),
        "columns": {"text": config.text_col, "label": config.label_col, "id": config.id_col},
        "rows_read": len(raw),
        "rows_dropped": {},
    }

    # 3. empty text / missing label
    empty_text = (work["text"].str.strip() == "").to_numpy()
    missing_label = (work["label"] == "").to_numpy() & ~empty_text
    for reason, mask in (("empty_text", empty_text), ("missing_label", missing_label)):
        if mask.any():
            card["rows_dropped"][reason] = {"count": int(mask.sum()), "rows": _examples(source_rows[mask])}
    if (empty_text | missing_label).all():
        raise DataError(
            f"all {len(work)} rows were dropped: {int(empty_text.sum())} with empty text in '{config.text_col}', "
            f"{int(missing_label.sum())} without a label in '{config.label_col}'",
            where=str(path),
            fix="check that --text-col and --label-col name the right columns",
        )
    work = work[~(empty_text | missing_label)]

    # 4. label set
    label_set = load_label_set(config.labels) if config.labels is not None else None
    if label_set is not None:
        _check_against_label_set(work, label_set, config.labels, path)

    # 5. duplicates and label conflicts
    work, dedup_card = _dedup(work, config)
    _release_freed_memory()
    card.update(dedup_card.pop("card"))
    if "label_conflict" in dedup_card:
        card["rows_dropped"]["label_conflict"] = dedup_card["label_conflict"]

    # 6. near-duplicate groups
    work["group"] = near_duplicate_groups(work["_norm"], config.near_duplicate_threshold, progress=progress)
    sizes = work["group"].value_counts()
    card["near_duplicates"] = {
        "threshold": config.near_duplicate_threshold,
        "groups": int((sizes > 1).sum()),
        "rows_in_groups": int(sizes[sizes > 1].sum()),
        "largest": int(sizes.max()),
        "mixed_label_groups": int((work.groupby("group")["label"].nunique() > 1).sum()),
    }

    # 7. rare classes
    work, rare_card = _handle_rare(work, config, path)
    card["rare_classes"] = rare_card
    if rare_card["policy"] == "drop" and rare_card["classes"]:
        card["rows_dropped"]["rare_class"] = {"count": rare_card["rows"], "rows": rare_card["example_rows"]}

    n_classes = work["label"].nunique()
    if n_classes < 2:
        raise DataError(
            f"only one class ({work['label'].iloc[0]!r}) is left after cleaning; a classifier needs at least two",
            where=str(path),
            fix="check --label-col, or lower --min-class-count / use --rare-policy merge if rare classes were dropped",
        )

    # 8. subsample
    card["subsample"] = None
    if config.max_rows is not None and config.max_rows < len(work):
        before = len(work)
        work = _subsample(work, config.max_rows, config.seed, config.min_class_count)
        card["subsample"] = {"max_rows": config.max_rows, "rows_before": before, "rows_after": len(work)}
    work["group"] = pd.factorize(work["group"])[0].astype(np.int64)

    # 9. split
    assignment = _split(work, config)
    frames = _output_frames(raw, work, assignment, config)

    labels = _labels_json(work, label_set, config, rare_card)
    observed = set(work["label"])
    card["rows_kept"] = len(work)
    card["n_classes"] = len(observed)
    card["n_labels"] = len(labels)
    card["labels_without_data"] = [d["label"] for d in labels if d["label"] not in observed]
    card["splits"] = {
        name: {
            "rows": len(frame),
            "groups": int(frame["group"].nunique()),
            "class_counts": {
                str(k): int(v)
                for k, v in sorted(
                    frame["label"].value_counts().items(), key=lambda kv: (-kv[1], _label_sort_key(kv[0]))
                )
            },
            "text_chars": _length_stats(frame["text"]),
        }
        for name, frame in frames.items()
    }
    for name in SPLITS:
        if name == "val" and config.val_size == 0:
            continue
        card[f"classes_absent_from_{name}"] = sorted(observed - set(frames[name]["label"]), key=_label_sort_key)
    card["seed"] = config.seed
    card["test_size"] = config.test_size
    card["val_size"] = config.val_size

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split_paths = {}
    for name, frame in frames.items():
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        split_paths[name] = out_dir / f"{name}.parquet"
        atomic_write_bytes(split_paths[name], buf.getvalue())
    write_json(out_dir / "labels.json", labels)
    write_resolved(config, out_dir)
    write_json(out_dir / "data_card.json", card)
    return PrepareResult(out_dir=out_dir, card=card, splits=split_paths)


_FLAGS = {"text_col": "--text-col", "label_col": "--label-col", "id_col": "--id-col"}


def _release_freed_memory() -> None:
    """Give the memory of freed Python strings back to the OS (glibc keeps it otherwise).

    Parsing and normalising ads make millions of short-lived strings; glibc keeps their pages, and the large
    arrays that come next are mapped anew beside them, so at 500k ads the kept pages alone were ~5 GB of the
    peak. Elsewhere than glibc this does nothing.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _check_columns(raw: pd.DataFrame, config: PrepareConfig, path: Path) -> None:
    named = {s: getattr(config, s) for s in _FLAGS if getattr(config, s) is not None}
    for a, b in itertools.combinations(named, 2):
        if named[a] == named[b]:
            raise DataError(
                f"{_FLAGS[a]} and {_FLAGS[b]} are the same column '{named[a]}'",
                where=str(path),
                found="columns " + ", ".join(raw.columns),
                fix=f"point {_FLAGS[a]} and {_FLAGS[b]} at two different columns",
            )
    for setting, flag in _FLAGS.items():
        col = getattr(config, setting)
        if col is not None and col not in raw.columns:
            raise DataError(
                f"column '{col}' ({setting}) not found",
                where=str(path),
                found="columns " + ", ".join(raw.columns),
                fix=f"pass {flag} with one of the columns above",
            )


def _make_ids(raw: pd.DataFrame, config: PrepareConfig, path: Path, rows: np.ndarray) -> np.ndarray:
    generated = np.array([f"row-{r}" for r in rows], dtype=object)
    if config.id_col is None:
        return generated
    ids = raw[config.id_col].str.strip().to_numpy(dtype=object)
    missing = ids == ""
    ids[missing] = generated[missing]
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        first = ids[dup][0]
        n_ids = len(set(ids[dup]))
        raise DataError(
            f"id '{first}' appears more than once ({_rows_text(rows[ids == first])}); "
            f"{n_ids} id{'s are' if n_ids > 1 else ' is'} duplicated in '{config.id_col}'",
            where=str(path),
            fix="make the id column unique, or leave --id-col unset to use row numbers as ids",
        )
    return ids


def _check_against_label_set(work: pd.DataFrame, label_set: pd.DataFrame, cfg: LabelSetConfig, path: Path) -> None:
    allowed = set(label_set["label"])
    data_labels = sorted(set(work["label"]), key=_label_sort_key)
    flt = f" (filter {_describe_filter(cfg.filter)})" if cfg.filter else ""
    if not allowed & set(data_labels):
        raise DataError(
            f"none of the {len(data_labels)} data labels is in the label set {cfg.path}{flt}; "
            "did you pick the right level/filter?",
            where=str(path),
            found="data labels "
            + ", ".join(repr(v) for v in data_labels[:EXAMPLES])
            + "; label set "
            + ", ".join(repr(v) for v in label_set["label"][:EXAMPLES]),
            fix="use the label file and labels.filter that match --label-col (e.g. level=isco_submajor)",
        )
    unknown = ~work["label"].isin(allowed).to_numpy()
    if unknown.any():
        bad = work[unknown]
        parts = []
        for label, sub in list(bad.groupby("label", sort=False))[:EXAMPLES]:
            parts.append(f"'{label}' ({_rows_text(sub['_row'], limit=3)})")
        n_labels = bad["label"].nunique()
        raise DataError(
            f"{int(unknown.sum())} rows have {n_labels} label{'s' if n_labels > 1 else ''} that are not in the "
            f"label set {cfg.path}{flt}: " + ", ".join(parts),
            where=str(path),
            fix="use the label file/filter that matches --label-col, or drop those rows from the input",
        )


def _dedup(work: pd.DataFrame, config: PrepareConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Keep one row per normalised text; resolve label conflicts inside a group by ``conflict_policy``."""
    norm, key, text_key = _normalised_keys(work["text"])
    work = work.assign(_norm=norm, _key=key, _text_key=text_key)
    n_labels = work.groupby("_key")["label"].nunique()
    conflict_keys = n_labels.index[n_labels > 1]
    conflicts = work[work["_key"].isin(conflict_keys)]
    out: dict[str, Any] = {}
    examples = []
    chosen: list[Any] = []
    for _, sub in conflicts.groupby("_key", sort=False):
        counts = Counter(sub["label"])
        best = max(counts.values())
        winner = next(label for label in sub["label"] if counts[label] == best)
        chosen.append(sub.index[(sub["label"] == winner).to_numpy()][0])
        if len(examples) < EXAMPLES:
            examples.append(
                {
                    "rows": [int(r) for r in sub["_row"]],
                    "labels": list(sub["label"]),
                    "kept_label": winner if config.conflict_policy == "majority" else None,
                }
            )
    conflict_card = {
        "groups": len(conflict_keys),
        "rows": len(conflicts),
        "policy": config.conflict_policy,
        "examples": examples,
    }
    if config.conflict_policy == "drop" and len(conflicts):
        out["label_conflict"] = {"count": len(conflicts), "rows": _examples(conflicts["_row"])}
        work = work[~work["_key"].isin(conflict_keys)]
        if work.empty:
            raise DataError(
                "every row is in a group of duplicates with conflicting labels",
                fix="use --conflict-policy majority",
            )
    keep = ~work["_key"].duplicated().to_numpy()
    if config.conflict_policy == "majority" and chosen:
        in_conflict = work["_key"].isin(conflict_keys).to_numpy()
        keep &= ~in_conflict
        keep |= work.index.isin(chosen)
    n_texts = int(work["_text_key"].nunique())
    dup_examples = []
    for _, sub in work[work["_key"].duplicated(keep=False)].groupby("_key", sort=False):
        kept = sub.index[keep[work.index.get_indexer(sub.index)]]
        dup_examples.append(
            {"kept_row": int(sub.loc[kept[0], "_row"]), "removed_rows": [int(r) for r in sub["_row"].drop(kept)]}
        )
        if len(dup_examples) >= EXAMPLES:
            break
    out["card"] = {
        "exact_duplicates_removed": len(work) - n_texts,
        "normalised_duplicates_removed": n_texts - int(work["_key"].nunique()),
        "duplicate_examples": dup_examples,
        "label_conflicts": conflict_card,
    }
    # A boolean take is already a new frame (pandas copy-on-write); with nothing to drop, keep the frame itself.
    return (work if keep.all() else work[keep]), out


def _normalised_keys(texts: pd.Series, step: int = 50_000) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """(normalised texts, duplicate-group key per row, exact-text key per row), computed in chunks.

    A row's key is the factorised 64-bit BLAKE2 hash of its normalised text (exact text: of the text), so
    the Python strings the normalisation makes exist for one chunk of ads at a time, never for all 500k: a
    collision needs ~4 billion distinct ads. A text that normalises to nothing (only punctuation) keys on itself,
    not on every other such text.
    """
    parts, keys, text_keys = [], [], []
    for start in range(0, len(texts), step):
        chunk = texts.iloc[start : start + step].tolist()
        normed = [normalise_for_dedup(t) or "\x00" + t.casefold() for t in chunk]
        parts.append(pd.Series(normed, index=texts.index[start : start + step], dtype=str))
        keys.append(np.fromiter((_hash64(t) for t in normed), dtype=np.uint64, count=len(chunk)))
        text_keys.append(np.fromiter((_hash64(t) for t in chunk), dtype=np.uint64, count=len(chunk)))
    norm = pd.concat(parts) if parts else pd.Series([], dtype=str)
    empty = np.zeros(0, dtype=np.uint64)
    key = pd.factorize(np.concatenate(keys) if keys else empty)[0]
    return norm, key, np.concatenate(text_keys) if text_keys else empty


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _handle_rare(work: pd.DataFrame, config: PrepareConfig, path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    counts = work["label"].value_counts()
    rare = counts[counts < config.min_class_count].sort_values(kind="stable")
    rare_dict = {str(k): int(v) for k, v in rare.items()}
    info: dict[str, Any] = {
        "policy": config.rare_policy,
        "min_class_count": config.min_class_count,
        "classes": rare_dict,
        "rows": int(rare.sum()),
        "merged_into": None,
        "example_rows": [],
    }
    if rare.empty:
        return work, info
    mask = work["label"].isin(rare.index).to_numpy()
    info["example_rows"] = _examples(work.loc[mask, "_row"])
    if config.rare_policy == "error":
        listed = ", ".join(f"'{k}' ({v})" for k, v in list(rare_dict.items())[:10])
        more = f" and {len(rare_dict) - 10} more" if len(rare_dict) > 10 else ""
        raise DataError(
            f"{len(rare_dict)} {'classes have' if len(rare_dict) > 1 else 'class has'} fewer than "
            f"{config.min_class_count} ads after deduplication: "
            f"{listed}{more}",
            where=str(path),
            fix="pass --rare-policy drop (remove them) or --rare-policy merge (relabel them "
            f"'{config.other_label}'), or lower --min-class-count",
        )
    if config.rare_policy == "drop":
        work = work[~mask]
        if work.empty:
            raise DataError(
                f"every class has fewer than {config.min_class_count} ads, so --rare-policy drop removed all rows",
                where=str(path),
                fix="lower --min-class-count or use --rare-policy merge",
            )
        return work, info
    work = work.copy()
    work.loc[mask, "label"] = config.other_label
    info["merged_into"] = config.other_label
    merged = int((work["label"] == config.other_label).sum())
    if merged < config.min_class_count:
        info["merged_class_still_rare"] = merged
    return work, info


def _subsample(work: pd.DataFrame, max_rows: int, seed: int, min_count: int) -> pd.DataFrame:
    """About ``max_rows`` rows as whole groups, with each label's share kept (and at least ``min_count``)."""
    groups = work.groupby("group", sort=True).agg(label=("label", "first"), size=("label", "size"))
    rng = np.random.default_rng(seed)
    frac = max_rows / len(work)
    chosen: list[np.ndarray] = []
    for _, sub in groups.groupby("label", sort=True):
        total = int(sub["size"].sum())
        quota = max(min(min_count, total), round(frac * total))
        order = rng.permutation(len(sub))
        cum = np.cumsum(sub["size"].to_numpy()[order])
        take = max(1, int(np.searchsorted(cum, quota, side="right")))
        chosen.append(sub.index.to_numpy()[order[:take]])
    return work[work["group"].isin(np.concatenate(chosen))]


def _first_fold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, what: str) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise DataError(
            f"only {n_groups} groups of ads are left for the {what} split, which needs at least {n_splits}",
            fix=f"add data, or raise --{what}-size (it needs 1/{what}-size groups)",
        )
    largest = int(pd.Series(y).value_counts().max())
    if largest < n_splits:  # scikit-learn would raise a bare ValueError here
        raise DataError(
            f"the largest class has {largest} ads, too few to stratify a {what} split of 1/{n_splits} of each class",
            fix=f"add data (at least {n_splits} ads in one class), or raise --{what}-size",
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        _, held_out = next(splitter.split(np.zeros(len(y)), y, groups))
    return held_out


def _split(work: pd.DataFrame, config: PrepareConfig) -> np.ndarray:
    """'train'/'val'/'test' for each row of ``work`` (group-aware, stratified, seeded)."""
    y = work["label"].to_numpy()
    groups = work["group"].to_numpy()
    assignment = np.full(len(work), "train", dtype=object)
    test = _first_fold(y, groups, max(2, round(1 / config.test_size)), config.seed, "test")
    assignment[test] = "test"
    if config.val_size > 0:
        rest = np.flatnonzero(assignment == "train")
        n_val = max(2, round((1 - config.test_size) / config.val_size))
        val = _first_fold(y[rest], groups[rest], n_val, config.seed, "val")
        assignment[rest[val]] = "val"
    return assignment


def _output_frames(
    raw: pd.DataFrame, work: pd.DataFrame, assignment: np.ndarray, config: PrepareConfig
) -> dict[str, pd.DataFrame]:
    used = {config.text_col, config.label_col, config.id_col}
    extras = [c for c in raw.columns if c not in used]
    renamed = {c: f"orig_{c}" if c in CORE_COLUMNS else c for c in extras}
    out = pd.DataFrame(
        {
            "id": work["id"].astype(str),
            "text": work["text"].astype(str),
            "label": work["label"].astype(str),
            "group": work["group"].astype(np.int64),
        },
        index=work.index,
    )
    out = pd.concat([out, raw.loc[work.index, extras].rename(columns=renamed).astype(str)], axis=1)
    return {name: out[assignment == name].reset_index(drop=True) for name in SPLITS}


def _labels_json(
    work: pd.DataFrame, label_set: pd.DataFrame | None, config: PrepareConfig, rare: dict[str, Any]
) -> list[dict[str, str]]:
    if label_set is not None:
        labels = label_set.to_dict(orient="records")
    else:
        observed = sorted(set(work["label"]) - {rare["merged_into"]}, key=_label_sort_key)
        labels = [{"label": v, "name": v, "description": ""} for v in observed]
    known = {d["label"] for d in labels}
    if rare["merged_into"] is not None and rare["merged_into"] not in known:
        labels.append({"label": config.other_label, "name": "other", "description": ""})
    return labels


# ------------------------------------------------------------------------------------------------ loading


def load_splits(prepare_dir: Path) -> dict[str, pd.DataFrame]:
    """The three splits written by ``prepare``.

    Returns:
        ``{"train", "val", "test"}`` frames with ``id``/``text``/``label`` as str, ``group`` as int64 and
        the input's other columns; ``val`` may have no rows.

    Raises:
        DataError: the folder or a split file is missing, or a file lacks the core columns.
    """
    prepare_dir = Path(prepare_dir)
    out = {}
    for name in SPLITS:
        path = prepare_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(
                f"split file {path} not found", fix=f"run `jobembed prepare` with the output folder {prepare_dir}"
            )
        frame = pd.read_parquet(path)
        missing = [c for c in CORE_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(
                f"{path} lacks the columns {', '.join(missing)}",
                found="columns " + ", ".join(frame.columns),
                fix="re-run `jobembed prepare` (the file is from another version or tool)",
            )
        for col in frame.columns:
            frame[col] = frame[col].astype(np.int64) if col == "group" else frame[col].fillna("").astype(str)
        out[name] = frame
    return out


def load_labels(prepare_dir: Path) -> pd.DataFrame:
    """``labels.json`` from ``prepare`` as a frame with columns ``label``, ``name``, ``description`` (str), and
    ``taxonomy`` (each label's own taxonomy text) and ``taxonomy_texts`` (every text rolled up into it, one per
    line) when prepare read a taxonomy."""
    path = Path(prepare_dir) / "labels.json"
    if not path.is_file():
        raise DataError(f"{path} not found", fix=f"run `jobembed prepare` with the output folder {prepare_dir}")
    rows = read_json(path)
    extra = ["taxonomy", "taxonomy_texts"] if any("taxonomy" in d for d in rows) else []
    columns = ["label", "name", "description", *extra]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.fillna("").astype(str)


def load_taxonomy_rows(prepare_dir: Path) -> pd.DataFrame | None:
    """prepare's ``taxonomy.parquet`` (``code, text, kind, label, own``; see ``jobembed.taxonomy``), or None when the
    run has no taxonomy. Row order is the file's: every encoder's ``taxonomy.npy`` follows it."""
    path = Path(prepare_dir) / "taxonomy.parquet"
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    for column in ("code", "text", "kind", "label"):
        frame[column] = frame[column].astype(str)
    return frame


def label_texts(labels: pd.DataFrame, mode: str) -> list[str]:
    """The text embedded for each category in zero-shot: its name, description, or both.

    Args:
        labels: frame with columns ``label``, ``name``, ``description`` (from ``prepare``'s labels.json).
        mode: ``name`` | ``description`` | ``name_description`` | ``taxonomy`` | ``taxonomy_mean`` (each label's
            texts one per line, for ``embed.label_vectors`` to average). A missing description falls back
            to the name, and a missing taxonomy text to ``name_description``, so no mode silently embeds empty
            strings.

    Raises:
        DataError: ``taxonomy`` on a run whose prepare read no taxonomy.
    """
    if mode in ("taxonomy", "taxonomy_mean"):
        if "taxonomy" not in labels.columns:
            raise DataError(
                f"embed.label_text is {mode}, but this run's prepare read no taxonomy (labels.json has no texts)",
                fix="set prepare.taxonomy (a table of code, text, kind) and re-run prepare, or pick another label_text",
            )
        fallback = label_texts(labels, "name_description")
        if mode == "taxonomy_mean":  # one line per text; each label's texts are averaged (embed.label_vectors)
            return [t if t.strip() else f for t, f in zip(labels["taxonomy_texts"], fallback, strict=True)]
        return [t if t.strip() else f for t, f in zip(labels["taxonomy"], fallback, strict=True)]
    names = labels["name"].fillna("").astype(str).where(lambda s: s.str.strip() != "", labels["label"].astype(str))
    desc = labels["description"].fillna("").astype(str)
    if mode == "name":
        return names.tolist()
    if mode == "description":
        return [d if d.strip() else n for n, d in zip(names, desc, strict=True)]
    return [f"{n}. {d}" if d.strip() else n for n, d in zip(names, desc, strict=True)]


def data_card_table(card: dict[str, Any]) -> Table:
    """A rich table of ads per class and split (sorted by train count, largest first) with totals in the caption."""
    splits = card["splits"]
    counts = {name: splits[name]["class_counts"] for name in SPLITS}
    labels = set().union(*counts.values())
    order = sorted(labels, key=lambda v: (-counts["train"].get(v, 0), _label_sort_key(v)))
    table = Table(title=f"prepare: {Path(card['input']).name}", title_justify="left")
    table.add_column("label")
    for name in (*SPLITS, "total"):
        table.add_column(name, justify="right")
    for label in order:
        row = [counts[name].get(label, 0) for name in SPLITS]
        table.add_row(label, *(str(v) for v in row), str(sum(row)))
    for label in card.get("labels_without_data", []):
        table.add_row(f"[dim]{label}[/dim]", "0", "0", "0", "0")
    table.add_row(
        "[bold]total[/bold]",
        *(f"[bold]{splits[n]['rows']}[/bold]" for n in SPLITS),
        f"[bold]{card['rows_kept']}[/bold]",
    )
    dropped = sum(v["count"] for v in card["rows_dropped"].values())
    near = card["near_duplicates"]
    conflicts = card["label_conflicts"]
    table.caption = (
        f"{card['rows_read']} rows read, {card['rows_kept']} kept, {card['n_classes']} classes; "
        f"{card['exact_duplicates_removed']} exact + {card['normalised_duplicates_removed']} normalised duplicates "
        f"removed, {dropped} rows dropped; {near['groups']} near-duplicate groups (largest {near['largest']}); "
        f"{conflicts['groups']} label conflicts ({conflicts['policy']})"
    )
    return table
