"""Reproduce docs/results.md: every system, 5-fold CV + held-out test, on pl-jobads with builtin e5-small.

    .venv/bin/python experiments/cv_results.py --label isco_submajor
    .venv/bin/python experiments/cv_results.py --label isco_major
    .venv/bin/python experiments/cv_results.py --label isco_submajor --text-column text   # the raw ads, no clean stage

``--text-column text`` reads prepare's raw text with no clean stage, as every run did before the clean stage existed:
the tables of docs/results.md#isco-sub-major-groups were made that way; the default reads the rules-cleaned text.

Runs the same stages as the CLI (prepare -> embed -> report) on all 8,006 ads; the embedding cache is
shared, so the second level costs no encoding. Outputs go to experiments/out/<label>-<tokens>/; the tables
below are printed from its report/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time

from common import OUT, pl_jobads

from jobembed.config import load_config
from jobembed.stages import run_stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor", choices=["isco_submajor", "isco_major"])
    ap.add_argument("--model", default="builtin:multilingual-e5-small")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--max-rows", type=int, default=None, help="stratified subsample (default: all ads)")
    ap.add_argument("--systems", default="zeroshot,centroid,tfidf,logreg,mlp")
    ap.add_argument("--text-column", default="clean_text", choices=["clean_text", "text"])
    args = ap.parse_args()
    name = f"{args.label}-{args.max_seq_length}" + (f"-{args.max_rows}" if args.max_rows else "")
    name += "-raw" if args.text_column == "text" else ""
    overrides = {
        "name": name,
        "runs_dir": str(OUT),
        "prepare": pl_jobads(args.label, max_rows=args.max_rows),
        "embed": {"model": args.model, "max_seq_length": args.max_seq_length, "batch_size": 32},
        "report": {"systems": args.systems.split(","), "cv_folds": 5},
        "text_column": args.text_column,
    }
    if args.text_column == "text":
        overrides["clean"] = {"backend": "none"}
    config = load_config(None, overrides)
    t0 = time.perf_counter()
    run_stages(config, target="report", progress=False)
    took = time.perf_counter() - t0
    metrics = json.loads((config.run_dir / "report" / "metrics.json").read_text())
    card = json.loads((config.run_dir / "prepare" / "data_card.json").read_text())
    print(f"\n{name}: {metrics['data']} in {took:.0f} s")
    print(f"rows read {card['rows_read']}, kept {card['rows_kept']}; near-duplicate groups {card['near_duplicates']}")
    print("| system | CV macro-F1 | CV accuracy | CV macro-F1 (≥5) | test acc [95% CI] | test macro-F1 [95% CI] |")
    print("|---|---|---|---|---|---|")
    for key in metrics["ranking"]:
        r = metrics["systems"][key]
        cv, t, ci = r["cv"]["summary"], r["test"], r["test_ci95"]
        print(
            f"| {r['display']} | {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f} | "
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f} | "
            f"{cv['macro_f1_min_support']['mean']:.3f} ± {cv['macro_f1_min_support']['std']:.3f} | "
            f"{t['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}] | "
            f"{t['macro_f1']:.3f} [{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}] |"
        )
    names = {k: r["display"] for k, r in metrics["systems"].items()}
    for pair in metrics["pairwise"]:
        print(
            f"{names[pair['a']]} vs {names[pair['b']]}: McNemar p={pair['mcnemar_test']['p_value']:.3g}, "
            f"CV t-test p={pair['cv_macro_f1_ttest']['p_value']:.3g}, "
            f"diff={pair['cv_macro_f1_ttest']['mean_diff']:+.3f}"
        )
    (config.run_dir / "summary.json").write_text(json.dumps({"seconds": took, **metrics["data"]}))


if __name__ == "__main__":
    main()
