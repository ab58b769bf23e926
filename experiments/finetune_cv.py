"""The fine-tuning recipe inside the CV on pl-jobads (issue 20): the fine-tuned systems in the CV table.

    .venv/bin/python experiments/finetune_cv.py          # fine-tunes one more fold (~35 min on 2 CPU cores), prints
                                                         # the folds made so far; the full report once all are done
    .venv/bin/python experiments/finetune_cv.py --folds 0   # print only

prepare (isco_submajor) -> clean (rules) -> embed (builtin e5-small, 256 tokens) -> finetune-cv: in each of the 3
repost-grouped CV folds of the dev pool, triplets mined on that fold's training rows and judged by the model judge,
the recipe of docs/results.md#fine-tuning (mnrl, class-aware, 1,728 triplets at 128 tokens, one evaluation)
fine-tuned there, every dev ad re-encoded; once every fold is done, finetune (the same recipe on train, for the
test split: ~25 more minutes) and the report with the fine-tuned systems in the CV table. Each invocation
fine-tunes at most ``--folds`` new folds (``report.max_new_folds``; finished folds are kept), so the 3 folds fit in
separate sittings. Until all are done it prints, per finished fold, the held-out macro-F1 of centroid cosine and the
MLP head on the frozen and on that fold's fine-tuned encoder.
Raw numbers: experiments/out/finetune-cv/report/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import OUT, pl_jobads
from finetune_quality import MAIN

from jobembed.config import load_config
from jobembed.evaluate import EvalSettings, FoldVectors, System, cross_validate, cv_folds, dev_pool
from jobembed.stages import pin_models, prepared, run_stages, run_vectors
from jobembed.stages.finetune_cv import FoldsLeft

FOLDS = 3
SYSTEMS = ["zeroshot", "centroid", "tfidf", "mlp", "fusion"]
RECIPE = MAIN | {"evals_per_epoch": 1}  # the recipe of docs/results.md#fine-tuning, one evaluation


def config_for(max_new_folds: int | None):
    return pin_models(
        load_config(
            None,
            {
                "name": "finetune-cv",
                "runs_dir": str(OUT),
                "text_column": "clean_text",
                "prepare": pl_jobads("isco_submajor"),
                "clean": {"backend": "rules", "language": "pl"},
                # torch vectors, named: issue 21's figures compare with issue 20's, whatever the CPU default becomes
                "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256, "backend": "torch"},
                "triplets": {"judge": "model", "positive": "nearest"},
                "finetune": RECIPE,
                "report": {
                    "systems": SYSTEMS,
                    "cv_folds": FOLDS,
                    "finetune_cv": True,
                    "max_new_folds": max_new_folds,
                },
            },
        )
    )


def print_folds(config) -> None:
    """Held-out macro-F1 of the finished folds: frozen vs that fold's fine-tuned encoder."""
    folder = config.run_dir / "finetune-cv" / "units"
    splits, labels = prepared(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    X_dev = np.concatenate([frozen.train, frozen.val])
    folds = cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed)
    settings = EvalSettings.of(config)
    print("| fold | triplets trained on | fine-tune s | system | frozen macro-F1 | fine-tuned macro-F1 |")
    print("|---|---|---|---|---|---|")
    for k in range(1, FOLDS + 1):
        unit = folder / f"fold-{k}"
        if not (unit / "stage.json").is_file():
            continue
        info = json.loads((unit / "fold.json").read_text())
        tuned = FoldVectors(dev=np.load(unit / "dev.npy"), labels=np.load(unit / "labels.npy"))
        for name in ("centroid", "mlp"):
            one = [folds[k - 1]]
            base, *_ = cross_validate(
                System(name, frozen), settings=settings, labels=labels, dev=dev, X_dev=X_dev, folds=one
            )
            ft, *_ = cross_validate(
                System(name, frozen, fold_vectors=(tuned,)), settings=settings, labels=labels, dev=dev, X_dev=None,
                folds=one,
            )  # fmt: skip
            print(
                f"| {k} | {info['finetune']['triplets']} | {info['finetune']['seconds']:.0f} | {name} | "
                f"{base[0]['macro_f1']:.3f} | {ft[0]['macro_f1']:.3f} |"
            )


def print_versus(m: dict) -> None:
    """The report's tests of each fine-tuned system: against the same system frozen and against TF-IDF + LR."""
    res = m["systems"]
    print("\n| fine-tuned | vs | CV diff | corrected t p | McNemar p out-of-fold | McNemar p test |")
    print("|---|---|---|---|---|---|")
    for key in m["ranking"]:
        for other, v in (res[key].get("versus") or {}).items():
            print(
                f"| {res[key]['display']} | {res[other]['display']} | {v['cv_macro_f1_diff']:+.3f} | "
                f"{v['cv_macro_f1_ttest']['p_value']:.3g} | {v['mcnemar_oof']['p_value']:.3g} | "
                f"{v['mcnemar_test']['p_value']:.3g} |"
            )


def print_report(config) -> None:
    m = json.loads((config.run_dir / "report" / "metrics.json").read_text())
    res = m["systems"]
    print("| system | CV macro-F1 | CV accuracy | test accuracy | test macro-F1 |")
    print("|---|---|---|---|---|")
    for key in m["ranking"]:
        r, cv = res[key], res[key]["cv"]["summary"]
        print(
            f"| {r['display']} | {cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f} | "
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f} | {r['test']['accuracy']:.3f} | "
            f"{r['test']['macro_f1']:.3f} |"
        )
    print_versus(m)
    print("\n" + json.dumps(m["finetune_cv"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=1, help="new folds to fine-tune now (0: print only)")
    args = ap.parse_args()
    config = config_for(args.folds or None)
    t0 = time.perf_counter()
    done = False
    if args.folds:
        try:  # the folds first: the test-split fine-tune and the report wait until every fold is done
            run_stages(config, target="finetune-cv", progress=False)
            run_stages(config, target="report", progress=False)
            done = True
        except FoldsLeft as stop:
            print(f"{stop} ({time.perf_counter() - t0:.0f} s)\n")
    else:
        run_stages(config, target="embed", progress=False)
        done = (config.run_dir / "report" / "metrics.json").is_file()
    if done:
        print(f"all {FOLDS} folds done ({time.perf_counter() - t0:.0f} s this sitting)\n")
        print_report(config)
    else:
        print_folds(config)


if __name__ == "__main__":
    main()
