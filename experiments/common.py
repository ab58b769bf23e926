"""Shared by the experiment scripts: where the data is, the pl-jobads pipeline config, peak memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
