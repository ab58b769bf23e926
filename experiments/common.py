"""Shared by the experiment scripts: where the data is, the pl-jobads pipeline config, peak memory, a report's
out-of-fold answers in the dev pool's order."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from jobembed.oof import OutOfFold, read_oof

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JOBEMBED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "experiments" / "out"


def pl_jobads(label: str = "isco_submajor", *, max_rows: int | None = None, min_class_count: int = 1) -> dict[str, Any]:
    """The ``prepare`` section for pl-jobads at one ISCO level, with its label set (names + descriptions)."""
    return {
        "input": str(DATA / "pl-jobads" / "ads.csv"),
        "text_col": "text",
        "label_col": label,
        "id_col": "id",
        "labels": {
            "path": str(DATA / "pl-jobads" / "labels.csv"),
            "code_col": "code",
            "name_col": "name_en",
            "description_col": "description_en",
            "filter": {"level": label},
        },
        # keep every class: the ones with 1 ad stay in train and still count in macro-F1 when tested
        "min_class_count": min_class_count,
        "max_rows": max_rows,
        "seed": 13,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB. Not ru_maxrss: Linux carries that over from the
    parent across fork+exec, so a child started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pl_taxonomy(out: Path = OUT / "pl-taxonomy.csv") -> Path:
    """pl-jobads' taxonomy folder (KZiS in Polish, the statistics office's thesaurus, ESCO's Polish labels) as the one
    ``code, text, kind`` table ``prepare.taxonomy`` reads; written once to ``out`` (derived data, not committed).

    Kinds: ``kzis_name`` (every level, 1-6 digits), ``kzis_synthesis`` and ``kzis_tasks`` (2-, 3- and 4-digit
    groups), ``occupation`` (the 2,552 6-digit names), ``thesaurus`` (job titles per 6-digit code), ``esco_name``,
    ``esco_alt``, ``esco_description``, ``esco_skills``.
    """
    import pandas as pd

    if out.is_file():
        return out
    folder = DATA / "pl-jobads" / "taxonomy"
    read = {"dtype": str, "keep_default_na": False}
    parts = [pd.read_csv(folder / "kzis-hierarchy-2023.tsv", sep="\t", **read).rename(columns={"class": "code"})
             .assign(kind="kzis_name").rename(columns={"name": "text"})]  # fmt: skip
    for level in (2, 3, 4):
        desc = pd.read_csv(folder / f"kzis-desc-level{level}.csv", **read)
        for column, kind in (("synteza", "kzis_synthesis"), ("zadania_zawodowe", "kzis_tasks")):
            parts.append(pd.DataFrame({"code": desc["kod"], "text": desc[column], "kind": kind}))
    official = pd.read_csv(folder / "kzis-official-2023.csv", **read)
    parts.append(pd.DataFrame({"code": official["code"], "text": official["name"], "kind": "occupation"}))
    thesaurus = pd.read_csv(folder / "gus-thesaurus.csv", **read)
    parts.append(pd.DataFrame({"code": thesaurus["code"], "text": thesaurus["desc"], "kind": "thesaurus"}))
    esco = pd.read_csv(folder / "esco-kzis-selected.csv", **read)
    kinds = {
        "occupation_name": "esco_name",
        "occupation_alternative_names": "esco_alt",
        "occupation_description": "esco_description",
        "skills": "esco_skills",
    }
    parts.append(pd.DataFrame({"code": esco["code"], "text": esco["desc"], "kind": esco["var"].map(kinds)}))
    table = pd.concat(parts, ignore_index=True)[["code", "text", "kind"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return out


def dev_rows(path: Path, ids: np.ndarray) -> OutOfFold:
    """A report's out-of-fold file (format- and column-checked), its rows in the dev pool's order ``ids``."""
    oof = read_oof(path)
    return replace(oof, ids=ids, probs=oof.rows_for(ids, what="dev ads", source=path))


if __name__ == "__main__":  # make pl-taxonomy: the table configs/default.yaml reads
    import sys

    print(pl_taxonomy(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT / "pl-taxonomy.csv"))
