"""What cleaning does for classification: the same pl-jobads splits and folds read raw, rules-cleaned and
GLiNER2-cleaned, through prepare -> clean -> embed -> report (builtin e5-small, 256 tokens).

    .venv/bin/python experiments/clean_effect.py                                      # raw vs rules
    .venv/bin/python experiments/clean_effect.py --cleanings none,rules,gliner2 \
        --gliner-model experiments/out/gliner-da --max-rows 2000          # GLiNER2 extraction is slow on 2 CPUs

Every variant has the same prepare config and seed, so the splits and the 5 CV folds are identical and the
fold scores pair up: the comparison of a cleaning with raw text is a corrected paired t-test over the CV folds
of the dev pool (train + validation). The default cleaning is chosen on that, never on the test split; the test
columns are printed for the record. Outputs go to experiments/out/clean-<cleaning>/.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import OUT, pl_jobads

from jobembed.clean.core import presets
from jobembed.config import load_config
from jobembed.metrics import corrected_paired_ttest
from jobembed.stages import run_stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--cleanings", default="none,rules")
    ap.add_argument("--gliner-model", default=None, help="GLiNER2 folder for the gliner2 cleaning")
    ap.add_argument("--language", default="pl")
    ap.add_argument("--gliner-schema", default="da", help="schema/template preset the extractor was trained with")
    ap.add_argument("--systems", default="centroid,tfidf,mlp")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--max-rows", type=int, default=None, help="stratified subsample (the same one for every cleaning)")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for cleaning in args.cleanings.split(","):
        clean = {"backend": cleaning, "language": args.language}
        if cleaning == "gliner2":
            # The extractor's own schema (the labels it was trained with), the ads' language for the rules fallback;
            # the threshold is the one `clean train` chose on its held-out documents.
            preset = presets()[args.gliner_schema]
            clean |= {"model": args.gliner_model, "entities": preset["entities"], "template": preset["template"]}
        overrides = {
            "name": f"clean-{cleaning}-{args.label}" + (f"-{args.max_rows}" if args.max_rows else ""),
            "runs_dir": str(OUT),
            "text_column": "text" if cleaning == "none" else "clean_text",
            "prepare": pl_jobads(args.label, max_rows=args.max_rows),
            "clean": clean,
            "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": args.max_seq_length},
            "report": {"systems": args.systems.split(","), "cv_folds": 5},
        }
        config = load_config(None, overrides)
        t0 = time.perf_counter()
        run_stages(config, target="report", progress=False)
        metrics = json.loads((config.run_dir / "report" / "metrics.json").read_text())
        clean_report = config.run_dir / "clean" / "report.json"
        summary = json.loads(clean_report.read_text()) if clean_report.is_file() else {}
        results[cleaning] = {"metrics": metrics, "clean": summary, "seconds": time.perf_counter() - t0}
        print(f"{cleaning}: {time.perf_counter() - t0:.0f} s", flush=True)

    print("\n| cleaning | mean chars/ad | system | CV macro-F1 | CV accuracy | vs raw (CV, paired) | test F1 |")
    print("|---|---|---|---|---|---|---|")
    raw = results.get("none")
    for cleaning, r in results.items():
        chars = r["clean"].get("mean_chars", {}).get("after") or r["clean"].get("mean_chars", {}).get("before", "")
        for s in r["metrics"]["systems"].values():
            cv = s["cv"]["summary"]
            versus = ""
            if raw is not None and cleaning != "none":
                base = _by_name(raw["metrics"], s["system"])
                if base is not None:
                    a = np.array([f["macro_f1"] for f in s["cv"]["folds"]])
                    b = np.array([f["macro_f1"] for f in base["cv"]["folds"]])
                    n_dev = sum(r["metrics"]["data"][k] for k in ("train", "val"))
                    test = corrected_paired_ttest(a, b, n_train=n_dev * (1 - 1 / len(a)), n_test=n_dev / len(a))
                    versus = f"{a.mean() - b.mean():+.3f} (p = {test['p_value']:.2f})"
            f1 = f"{cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f}"
            print(
                f"| {cleaning} | {chars} | {s['display']} | {f1} | "
                f"{cv['accuracy']['mean']:.3f} | {versus} | {s['test']['macro_f1']:.3f} |"
            )
    for cleaning, r in results.items():
        c = r["clean"]
        if c:
            print(
                f"\n{cleaning}: sources {c['sources']}, PII rows left {c['pii_check']['rows_with_pii']}, "
                f"chars {c['mean_chars']}, clean stage {c['seconds']} s"
            )


def _by_name(metrics: dict, name: str) -> dict | None:
    return next((s for s in metrics["systems"].values() if s["system"] == name), None)


if __name__ == "__main__":
    main()
