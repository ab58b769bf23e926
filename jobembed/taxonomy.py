"""The label taxonomy's own texts (not ads): one table of ``code, text, kind``, rolled up to the run's labels.

Every portal has such a taxonomy: the official occupation classification with descriptions and tasks per group,
occupation names, a thesaurus of job titles, ESCO's labels (pl-jobads: KZiS / ISCO-08 in Polish; Jobnet: DISCO-08
and ESCO's Danish labels). ``prepare`` reads it (``prepare.taxonomy``) and writes ``prepare/taxonomy.parquet``:

- ``code``: the taxonomy's code of the text (any level: ``"24"``, ``"2411"``, ``"241101"``);
- ``text``: the text; ``kind``: what it is (``name``, ``description``, ``tasks``, ``title``, ... as the table says);
- ``label``: the run's label it belongs to: by code prefix (the longest label code that starts the text's code, so
  ``"241101"`` goes to ``"24"``) or by an explicit ``code, label`` map;
- ``own``: whether the text's code is the label's own code (a text of the group itself, not of a finer one).

Codes of a class that prepare merged into ``other_label`` (too few ads) go to that class, since its ads carry that
label now; codes of a dropped class, codes coarser than every label (a 1-digit group for 2-digit labels) and codes
that match no label are left out. ``data_card.json`` counts each, and lists the labels no text reaches.

These rows are never ads: no split holds them, and what reads them adds them to training sides only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from jobembed.data import normalise_label
from jobembed.errors import DataError
from jobembed.sections import TaxonomyConfig, TaxonomyRollUp
from jobembed.tables import read_table

COLUMNS = ["code", "text", "kind", "label", "own"]


def load_taxonomy(config: TaxonomyConfig) -> pd.DataFrame:
    """The table as ``code, text, kind`` (str, stripped); rows with an empty code or text are dropped.

    Raises:
        DataError: the file cannot be read or lacks a configured column.
    """
    raw = read_table(Path(config.path), what="prepare.taxonomy.path")
    missing = [c for c in (config.code_col, config.text_col, config.kind_col) if c not in raw.columns]
    if missing:
        raise DataError(
            f"the taxonomy table has no column {', '.join(map(repr, missing))} (it has {', '.join(raw.columns)})",
            where=str(config.path),
            fix="name its columns with prepare.taxonomy.code_col / text_col / kind_col",
        )
    frame = pd.DataFrame(
        {
            "code": raw[config.code_col].map(normalise_label).astype(str),
            "text": raw[config.text_col].fillna("").astype(str).str.strip(),
            "kind": raw[config.kind_col].fillna("").astype(str).str.strip(),
        }
    )
    return frame[(frame["code"] != "") & (frame["text"] != "")].drop_duplicates().reset_index(drop=True)


def _code_map(config: TaxonomyConfig) -> dict[str, str]:
    if config.map is None:
        raise DataError(
            "prepare.taxonomy.roll_up is map, but no map file is set",
            fix="set prepare.taxonomy.map to a CSV of code,label",
        )
    raw = read_table(Path(config.map), what="prepare.taxonomy.map")
    if not {"code", "label"} <= set(raw.columns):
        raise DataError(
            f"the taxonomy map needs columns code and label (it has {', '.join(raw.columns)})",
            where=str(config.map),
            fix="write it as a CSV with a header line `code,label`",
        )
    return dict(zip(raw["code"].map(normalise_label), raw["label"].map(normalise_label), strict=True))


def roll_up(
    frame: pd.DataFrame,
    *,
    labels: list[str],
    config: TaxonomyConfig,
    merged: dict[str, str],
    dropped: set[str],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Each text's label among ``labels`` (prefix or map), with what was left out and why.

    Args:
        frame: ``load_taxonomy``'s table.
        labels: the run's labels (labels.json's codes, ``other_label`` included when prepare merged into it).
        merged: a class prepare merged -> the class it went into.
        dropped: classes prepare dropped (their texts are left out).

    Returns:
        (``COLUMNS`` frame, the data card's ``taxonomy`` entry).
    """
    if config.roll_up is TaxonomyRollUp.map:
        mapping = _code_map(config)
        target = frame["code"].map(mapping)
        own = target.notna() & (frame["code"] == target)
    else:
        by_length = sorted(set(labels), key=len, reverse=True)
        target = frame["code"].map(lambda code: next((lab for lab in by_length if code.startswith(lab)), None))
        own = target.notna() & (frame["code"] == target)
    coarser = target.isna() & frame["code"].map(lambda code: any(lab.startswith(code) for lab in labels))
    out = frame.assign(label=target, own=own)
    out = out[out["label"].notna()].copy()
    gone = out["label"].isin(dropped)
    moved = out["label"].map(merged)
    card: dict[str, Any] = {
        "path": str(config.path),
        "rows_read": len(frame),
        "left_out": {
            "coarser_than_labels": int(coarser.sum()),
            "no_label": int((target.isna() & ~coarser).sum()),
            "class_dropped": int(gone.sum()),
        },
        "merged_into_other": int(moved.notna().sum()),
    }
    out = out[~gone.to_numpy()]
    moved = moved[~gone.to_numpy()]
    out.loc[moved.notna(), "own"] = False  # a merged class's texts describe part of the class, not all of it
    out.loc[moved.notna(), "label"] = moved[moved.notna()]
    out = out.reset_index(drop=True)[COLUMNS]
    card["rows"] = len(out)
    card["by_kind"] = {str(k): int(v) for k, v in out["kind"].value_counts().sort_index().items()}
    card["own_rows"] = int(out["own"].sum())
    card["labels_without_text"] = sorted(set(labels) - set(out["label"]) - dropped)
    return out, card


def label_text(taxonomy: pd.DataFrame, label: str, kinds: list[str]) -> str:
    """The label's own texts of ``kinds`` (in that order; all kinds in table order when empty), joined: what
    zero-shot embeds with ``embed.label_text: taxonomy``. Empty when the taxonomy has no own text for it."""
    rows = taxonomy[(taxonomy["label"] == label) & taxonomy["own"]]
    if kinds:
        rows = rows[rows["kind"].isin(kinds)]
        rows = rows.assign(_order=rows["kind"].map({k: i for i, k in enumerate(kinds)})).sort_values(
            "_order", kind="stable"
        )
    return ". ".join(t.rstrip(". ") for t in rows["text"])


def label_texts_all(taxonomy: pd.DataFrame, label: str, kinds: list[str]) -> str:
    """Every text of ``kinds`` (all kinds when empty) rolled up into ``label``, at any level, one per line (line
    breaks inside a text become spaces): what ``embed.label_text: taxonomy_mean`` averages."""
    rows = taxonomy[taxonomy["label"] == label]
    if kinds:
        rows = rows[rows["kind"].isin(kinds)]
    return "\n".join(" ".join(t.split()) for t in rows["text"])
