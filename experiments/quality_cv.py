"""Issue 21: the levers that the validation screens kept, through the CV with fine-tuning inside each fold, then the
test split read once for the CV-chosen system and the baselines.

    .venv/bin/python experiments/quality_cv.py                 # fine-tunes one more fold (~30-45 min on 2 CPU cores)
    .venv/bin/python experiments/quality_cv.py --folds 3       # every fold left, then the test-split fine-tune and
                                                               # the report (the test split's one reading)
    .venv/bin/python experiments/quality_cv.py --folds 0       # print what is done

pl-jobads `isco_submajor`, the settings of experiments/finetune_cv.py (rules-cleaned text, builtin e5-small at 256
tokens, the same seed-13 splits and 3 repost-grouped CV folds of the dev pool) plus:

- `prepare.taxonomy` (experiments/common.py: pl_taxonomy()) and `report.taxonomy_rows` as experiments/levers.py chose
  them on the CV of the frozen encoder (lever 1);
- the fine-tuning objective experiments/objectives.py chose on validation (lever 2; `--loss`, `--epochs`), run inside
  every fold on the fold's training ads outside its inner slice (the finetune-cv stage), and once on the train split
  for the test split and the bundle (`--max-seq-length`: its training tokens, 128 unless a screen chose more);
- `--prior-power A`: fusion's prior correction (`report.hybrid.prior_power`), A chosen on the CV's out-of-fold
  answers by experiments/prior_power.py. Run it in a copy of this run folder (`cp -a experiments/out/quality-cv
  experiments/out/quality-cv-prior` then `--name quality-cv-prior --folds 3`), so the fold fine-tunes are reused
  (only the report re-runs, reading the test split once for this configuration) and the first report stays;
- `--seeds 14 15`: the same fine-tune on the train split with more seeds, each scored once on the test split (the
  finetune-seeds stage; seed 13 is the bundled one): the winner's spread over fine-tuning draws. In an existing run
  folder the fold fine-tunes and seed 13's are reused; the report re-runs;
- the systems: TF-IDF + LR, centroid, MLP and fusion on the frozen and the fine-tuned encoders, and the end-to-end
  classifier's own layer (`e2e`) where the loss is `classifier`; `--topdown` adds the top-down system (off by default:
  it lost to flat fusion on the frozen encoder at every rows weight, experiments/levers.py).

The report ranks every system by CV macro-F1 (the fine-tuned ones with the frozen ones, each compared with the same
system frozen and with TF-IDF + LR: corrected t-test over the folds, exact McNemar on the pooled out-of-fold answers);
the test split is scored once, by that report. Printed: the CV table, the tests, the rare classes' out-of-fold F1,
the major-group accuracy read off the sub-major answer, and the best system against the published reference (0.789
accuracy at 2 digits, 0.828 at 1 digit). Raw numbers: experiments/out/quality-cv/report/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time

from common import OUT, pl_jobads, pl_taxonomy
from finetune_cv import print_versus

from jobembed.config import load_config
from jobembed.report import _seeds_section
from jobembed.stages import pin_models, run_stages
from jobembed.stages.finetune_cv import FoldsLeft

FOLDS = 3
REFERENCE = {"accuracy_2_digits": 0.789, "accuracy_1_digit": 0.828}


def config_for(args: argparse.Namespace, max_new_folds: int | None):
    finetune = {
        "enabled": True,
        "loss": args.loss,
        "epochs": args.epochs,
        "max_seq_length": getattr(args, "max_seq_length", 128),
        "batch_size": 32,
        "learning_rate": 3e-5,
        "evals_per_epoch": 1,
        "eval_train_ads": 1000,
        "seed": 13,
        # the test-split protocol over fine-tuning seeds (the finetune-seeds stage): the winner's spread on test
        "seeds": [13, *getattr(args, "seeds", [])] if getattr(args, "seeds", []) else [],
    }
    if args.loss == "mnrl":
        finetune["max_triplets"] = 1728
    # topdown only on request: on the frozen encoder it lost to flat fusion at every rows weight (levers.py, McNemar
    # p = 0.001 against it at weight 3), and its fits cost ~7 minutes per encoder on 2 cores
    systems = ["tfidf", "centroid", "mlp", "fusion"] + (["topdown"] if args.topdown else [])
    systems += ["e2e"] if args.loss == "classifier" else []
    rows = None if args.rows_weight <= 0 else {"weight": args.rows_weight, "kinds": args.rows_kinds or []}
    return pin_models(
        load_config(
            None,
            {
                "name": args.name,
                "runs_dir": str(OUT),
                "text_column": "clean_text",
                "prepare": pl_jobads("isco_submajor") | {"taxonomy": {"path": str(pl_taxonomy())}},
                "clean": {"backend": "rules", "language": "pl"},
                # torch vectors, as issue 20's figures (experiments/finetune_cv.py)
                "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256, "backend": "torch"},
                "triplets": {"judge": "model", "positive": "nearest"},
                "finetune": finetune,
                "report": {
                    "systems": systems,
                    "cv_folds": FOLDS,
                    "finetune_cv": True,
                    "max_new_folds": max_new_folds,
                    "taxonomy_rows": rows,
                    "topdown_base": "fusion",
                    # fusion's prior correction (experiments/prior_power.py chose it in the CV); 0: none
                    "hybrid": {"prior_power": getattr(args, "prior_power", 0.0)},
                },
            },
        )
    )


def print_report(config) -> None:
    m = json.loads((config.run_dir / "report" / "metrics.json").read_text())
    res = m["systems"]
    print("| system | CV macro-F1 | CV accuracy | CV major accuracy | test accuracy [95% CI] | test macro-F1 [95% CI] |"
          " test major accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for key in m["ranking"]:
        r, cv = res[key], res[key]["cv"]["summary"]
        ci = r["test_ci95"]
        major = cv.get("parent_accuracy", {}).get("mean", float("nan"))
        test_major = (r.get("test_parent") or {}).get("accuracy", float("nan"))
        print(
            f"| {r['display']} | {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f} | "
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f} | {major:.3f} | {r['test']['accuracy']:.3f} "
            f"[{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}] | {r['test']['macro_f1']:.3f} "
            f"[{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}] | {test_major:.3f} |"
        )
    print_versus(m)
    rare = m.get("rare_classes_oof") or {}
    if rare.get("classes"):
        shown = m["ranking"][:4]
        print("\n| class | dev ads | " + " | ".join(res[k]["display"] for k in shown) + " |")
        print("|---|---|" + "---|" * len(shown))
        for c, n in rare["classes"].items():
            print(f"| {c} | {n} | " + " | ".join(f"{rare['systems'][k][c]['f1']:.2f}" for k in shown) + " |")
    best = res[m["winner"]]
    low = best["test_ci95"]["accuracy"][0]
    verdict = "past" if low > REFERENCE["accuracy_2_digits"] else "not past"
    print(
        f"\nbest by CV: {best['display']}; test accuracy {best['test']['accuracy']:.3f} (95% CI from {low:.3f}): "
        f"{verdict} the reference's {REFERENCE['accuracy_2_digits']} at 2 digits (gap "
        f"{best['test']['accuracy'] - REFERENCE['accuracy_2_digits']:+.3f}); major groups read off it "
        f"{(best.get('test_parent') or {}).get('accuracy', float('nan')):.3f} vs {REFERENCE['accuracy_1_digit']}"
    )
    if m.get("finetune_seeds"):
        print("\n".join(_seeds_section(m)))
    print("\n" + json.dumps(m.get("finetune_cv"), indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=1, help="new folds to fine-tune now (0: print only)")
    ap.add_argument("--loss", default="classifier", help="the objective the screen chose (experiments/objectives.py)")
    ap.add_argument("--epochs", type=float, default=1.0, help="the screen's budget: one epoch")
    ap.add_argument("--max-seq-length", type=int, default=128, help="training tokens (objectives.py's screens)")
    ap.add_argument("--rows-weight", type=float, default=3.0, help="taxonomy rows' weight (levers.py chose 3); 0: none")
    ap.add_argument("--rows-kinds", nargs="*", default=None)
    ap.add_argument("--topdown", action="store_true", help="add the top-down system (lost on the frozen encoder)")
    ap.add_argument(
        "--prior-power", type=float, default=0.0, help="fusion's prior correction (prior_power.py chose 0.4); 0: none"
    )
    ap.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="more fine-tuning seeds scored on test (beside seed 13)"
    )
    ap.add_argument("--name", default="quality-cv")
    args = ap.parse_args()
    config = config_for(args, args.folds or None)
    t0 = time.perf_counter()
    if args.folds:
        try:
            run_stages(config, target="finetune-cv", progress=False)
            run_stages(config, target="report", progress=False)
        except FoldsLeft as stop:
            print(f"{stop} ({time.perf_counter() - t0:.0f} s)")
            return
    if (config.run_dir / "report" / "metrics.json").is_file():
        print(f"done ({time.perf_counter() - t0:.0f} s this sitting)\n")
        print_report(config)
    else:
        print("the folds are not all done: run again with --folds N")


if __name__ == "__main__":
    main()
