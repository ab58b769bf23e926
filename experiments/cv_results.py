"""Reproduce docs/results.md: every system, 5-fold CV + held-out test, on pl-jobads with builtin e5-small.

    .venv/bin/python experiments/cv_results.py --label isco_submajor
    .venv/bin/python experiments/cv_results.py --label isco_major

Uses the same stage functions as the CLI (prepare -> compare-report) on all 8,006 ads; the embedding cache
is shared, so the second level costs no encoding. Outputs go to experiments/out/<label>-<tokens>/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from jobembed.config import load_config
from jobembed.pipeline import run_compare_report, run_prepare

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JOBEMBED_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor", choices=["isco_submajor", "isco_major"])
    ap.add_argument("--model", default="builtin:multilingual-e5-small")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--max-rows", type=int, default=None, help="stratified subsample (default: all ads)")
    ap.add_argument("--systems", default="zeroshot,centroid,tfidf,logreg,mlp")
    args = ap.parse_args()
    name = f"{args.label}-{args.max_seq_length}" + (f"-{args.max_rows}" if args.max_rows else "")
    overrides = {
        "name": name,
        "runs_dir": str(ROOT / "experiments" / "out"),
        "prepare": {
            "input": str(DATA / "pl-jobads" / "ads.csv"),
            "text_col": "text",
            "label_col": args.label,
            "id_col": "id",
            "labels": {
                "path": str(DATA / "pl-jobads" / "labels.csv"),
                "code_col": "code",
                "name_col": "name_en",
                "description_col": "description_en",
                "filter": {"level": args.label},
            },
            # keep every class: the ones with 1 ad stay in train and still count in macro-F1 when tested
            "min_class_count": 1,
            "max_rows": args.max_rows,
            "seed": 13,
        },
        "embed": {"model": args.model, "max_seq_length": args.max_seq_length, "batch_size": 32},
        "report": {"systems": args.systems.split(","), "cv_folds": 5},
    }
    config = load_config(None, overrides)
    t0 = time.perf_counter()
    run_prepare(config, progress=False)
    metrics = run_compare_report(config, progress=True)
    took = time.perf_counter() - t0
    print(f"\n{name}: {metrics['data']} in {took:.0f} s")
    print("| system | CV macro-F1 | CV accuracy | CV macro-F1 (≥5) | test acc | test macro-F1 | test macro-F1 (≥5) |")
    print("|---|---|---|---|---|---|---|")
    for key in metrics["ranking"]:
        r = metrics["systems"][key]
        cv, t = r["cv"]["summary"], r["test"]
        print(
            f"| {key} | {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f} | "
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f} | "
            f"{cv['macro_f1_min_support']['mean']:.3f} ± {cv['macro_f1_min_support']['std']:.3f} | "
            f"{t['accuracy']:.3f} | {t['macro_f1']:.3f} | {t['macro_f1_min_support']:.3f} |"
        )
    for pair in metrics["pairwise"]:
        print(
            f"{pair['a']} vs {pair['b']}: McNemar p={pair['mcnemar_test']['p_value']:.3g}, "
            f"CV t-test p={pair['cv_macro_f1_ttest']['p_value']:.3g}, "
            f"diff={pair['cv_macro_f1_ttest']['mean_diff']:+.3f}"
        )
    (ROOT / "experiments" / "out" / name / "summary.json").write_text(json.dumps({"seconds": took, **metrics["data"]}))


if __name__ == "__main__":
    main()
