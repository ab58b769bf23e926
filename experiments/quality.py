"""The quality issue's systems on pl-jobads: hybrid lexical + semantic heads, the hierarchy head, abstention.

    .venv/bin/python experiments/quality.py --label isco_submajor     # ~40 min on 2 CPU cores (vectors cached)
    .venv/bin/python experiments/quality.py --label isco_major

prepare -> clean (rules) -> embed (builtin e5-small, 256 tokens) -> report with TF-IDF + LR, the MLP
head, late fusion, stacking and the hierarchy head on the same splits and the same 5 CV folds of the dev pool
(train + validation). Every choice inside a system (fusion weight, temperature, early stopping) is made on
validation rows (the validation split for the test fit, a held-out part of the fold's training rows inside CV); the
abstention threshold on the out-of-fold answers of the CV; the test split is scored once. Prints the tables of
docs/results.md#quality; raw numbers in experiments/out/quality-<label>/report/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import OUT, pl_jobads

from jobembed.config import PipelineConfig, load_config
from jobembed.metrics import corrected_paired_ttest
from jobembed.stages import run_stages

SYSTEMS = "tfidf,logreg,mlp,fusion,stack,hier"


def quality_config(
    label: str = "isco_submajor",
    *,
    systems: list[str] | None = None,
    max_rows: int | None = None,
    max_seq_length: int = 256,
    target_accuracy: float = 0.9,
) -> PipelineConfig:
    """The run this script makes (experiments/bench_serve.py bundles its winner)."""
    return load_config(
        None,
        {
            "name": f"quality-{label}" + (f"-{max_rows}" if max_rows else ""),
            "runs_dir": str(OUT),
            "text_column": "clean_text",
            "prepare": pl_jobads(label, max_rows=max_rows),
            "clean": {"backend": "rules", "language": "pl"},
            "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": max_seq_length},
            "report": {"systems": systems or SYSTEMS.split(","), "cv_folds": 5, "target_accuracy": target_accuracy},
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--max-rows", type=int, default=None, help="stratified subsample (a quick check)")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--target-accuracy", type=float, default=0.9)
    args = ap.parse_args()
    config = quality_config(
        args.label,
        systems=args.systems.split(","),
        max_rows=args.max_rows,
        max_seq_length=args.max_seq_length,
        target_accuracy=args.target_accuracy,
    )
    name = config.name
    t0 = time.perf_counter()
    run_stages(config, target="report", progress=False)
    m = json.loads((config.run_dir / "report" / "metrics.json").read_text())
    print(f"{name}: {time.perf_counter() - t0:.0f} s\n")
    print_tables(m)


def print_tables(m: dict) -> None:
    systems = m["systems"]
    n_dev = m["data"]["train"] + m["data"]["val"]

    def key_of(system: str) -> str | None:
        return next((k for k, s in systems.items() if s["system"] == system), None)

    def versus(a: dict, b_key: str | None, metric: str = "macro_f1") -> str:
        if b_key is None or systems[b_key] is a:
            return ""
        x = np.array([f[metric] for f in a["cv"]["folds"]])
        y = np.array([f[metric] for f in systems[b_key]["cv"]["folds"]])
        t = corrected_paired_ttest(x, y, n_train=n_dev * (1 - 1 / len(x)), n_test=n_dev / len(x))
        return f"{x.mean() - y.mean():+.3f} (p = {t['p_value']:.2g})"

    tfidf, mlp = key_of("tfidf"), key_of("mlp")
    print(
        "| system | CV macro-F1 | CV accuracy | vs TF-IDF + LR (macro-F1, p) | vs MLP | test macro-F1 | test accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in m["ranking"]:
        s = systems[key]
        cv = s["cv"]["summary"]
        weight = f" (w = {s['fusion_weight']:.2f})" if s.get("fusion_weight") is not None else ""
        print(
            f"| {s['display']}{weight} | {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f} | "
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f} | {versus(s, tfidf)} | {versus(s, mlp)} | "
            f"{s['test']['macro_f1']:.3f} | {s['test']['accuracy']:.3f} |"
        )
    print(
        "\nCV accuracy vs TF-IDF + LR:",
        {systems[k]["display"]: versus(systems[k], tfidf, "accuracy") for k in m["ranking"]},
    )
    h = m.get("hierarchy", {})
    print(f"\nHierarchy: {h.get('note')}")
    if h.get("parents"):
        print(
            "\n| system | CV parent macro-F1 | CV parent accuracy | vs TF-IDF + LR (parent macro-F1, p) | "
            "test parent macro-F1 |"
        )
        print("|---|---|---|---|---|")
        for key in m["ranking"]:
            s = systems[key]
            cv = s["cv"]["summary"]
            print(
                f"| {s['display']} | {cv['parent_macro_f1']['mean']:.3f} ± {cv['parent_macro_f1']['std']:.3f} | "
                f"{cv['parent_accuracy']['mean']:.3f} ± {cv['parent_accuracy']['std']:.3f} | "
                f"{versus(s, tfidf, 'parent_macro_f1')} | {s['test_parent']['macro_f1']:.3f} |"
            )
    print(
        "\n| system | threshold for target (out-of-fold) | dev coverage (out-of-fold) | test coverage | "
        "test accuracy of answered | test ECE before | after temperature (val) |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in m["ranking"]:
        s = systems[key]
        sel = s.get("selective")
        if not sel:
            continue
        thr = "–" if sel["threshold"] is None else f"{sel['threshold']:.3f}"
        c = sel["calibration"]
        print(
            f"| {s['display']} | {thr} | {sel['oof']['coverage']:.3f} | {sel['test']['coverage']:.3f} | "
            f"{sel['test']['accuracy']:.3f} | {c['ece_test']:.3f} | {c['ece_test_scaled']:.3f} |"
        )


if __name__ == "__main__":
    main()
