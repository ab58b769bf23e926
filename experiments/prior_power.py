"""Issue 21: fusion's prior correction (`report.hybrid.prior_power`), chosen inside the quality CV's folds.

    .venv/bin/python experiments/prior_power.py     # seconds; needs experiments/quality_cv.py's report first
    .venv/bin/python experiments/prior_power.py --versus quality-cv-prior   # that report (quality_cv.py
                                                    # --prior-power A) against the first, system by system

Logit adjustment (Menon et al., 2021, "Long-tail learning via logit adjustment"): a system's probabilities divided
by the class shares of its training ads to a power a, renormalised; a = 0 is the system as fitted, a = 1 the
balanced-error rule for a model calibrated to the training shares. Macro-F1 weighs every class alike, so a > 0 trades
some accuracy on the frequent classes for answers on the rare ones.

Reads experiments/out/quality-cv/report/oof/ (every CV system's out-of-fold probabilities of the 6,248 dev ads) and
the same 3 repost-grouped folds. For each fold, a is the grid point (0, 0.1, ..., 1) with the best macro-F1 on the
*other* folds' out-of-fold answers, the prior is the class shares of the other folds' ads (add-one, as the head
computes it from its training ads; taxonomy rows make no part of it), and the fold is scored once at that a. Printed:
per system the a chosen in each fold and the CV macro-F1 and accuracy without and with the correction; then the
pooled curve of the CV winner (the fine-tuned fusion). The test split is not read: a configuration chosen here goes
through experiments/quality_cv.py --prior-power A, whose report reads the test split once for it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import OUT, dev_rows
from quality_cv import config_for
from recipe_versus import compare

from jobembed import metrics
from jobembed.evaluate import cv_folds, dev_pool
from jobembed.stages import prepared

REPORT = OUT / "quality-cv" / "report"
GRID = np.round(np.arange(0, 1.01, 0.1), 2)
FOLDS = 3  # experiments/quality_cv.py's


def corrected(proba: np.ndarray, prior: np.ndarray, power: float) -> np.ndarray:
    """``proba`` over ``prior ** power``, renormalised: what HybridHead.predict_proba does with prior_power."""
    z = proba / prior**power
    return z / z.sum(axis=1, keepdims=True)


def scores(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    m = metrics.classification_metrics(y[rows], classes[proba[rows].argmax(axis=1)], min_support=5)
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versus", default=None, help="a run folder under experiments/out made with --prior-power")
    args = ap.parse_args()
    meta_path = REPORT / "oof" / "oof.json"
    if not meta_path.is_file():
        raise SystemExit(f"{meta_path} not found: run experiments/quality_cv.py --folds 3 first")
    meta = json.loads(meta_path.read_text())
    systems = json.loads((REPORT / "metrics.json").read_text())["systems"]
    run = argparse.Namespace(
        loss="classifier", epochs=1.0, rows_weight=3.0, rows_kinds=None, topdown=False, prior_power=0.0,
        name="quality-cv",
    )  # fmt: skip
    config = config_for(run, None)  # the quality CV's settings: its prepared splits and its folds
    splits, _ = prepared(config)
    dev = dev_pool(splits)
    y = dev["label"].to_numpy(dtype=str)
    ids = dev["id"].to_numpy(dtype=str)
    classes = np.asarray(meta["classes"], dtype=str)
    folds = cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed)
    print("| system | a chosen per fold | CV macro-F1, a = 0 | CV macro-F1, corrected | CV acc, a = 0 "
          "| CV acc, corrected |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for key, entry in meta["systems"].items():
        proba = dev_rows(REPORT / "oof" / entry["file"], ids).probs
        chosen, before, after = [], [], []
        for k, (_, held) in enumerate(folds):
            other = np.concatenate([te for j, (_, te) in enumerate(folds) if j != k])
            counts = (y[other][:, None] == classes[None, :]).sum(axis=0) + 1.0
            prior = counts / counts.sum()
            a = max(GRID, key=lambda a: (scores(y, corrected(proba, prior, a), classes, other)["macro_f1"], -a))
            chosen.append(float(a))
            before.append(scores(y, proba, classes, held))
            after.append(scores(y, corrected(proba, prior, a), classes, held))
        s = systems[key]
        name = f"{s['system']} ({'fine-tuned' if 'finetune' in str(s['encoder']) else 'frozen'})"
        name = "TF-IDF + LR" if s["system"] == "tfidf" else name

        def cell(rows, metric):
            v = np.array([r[metric] for r in rows])
            return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"

        lift = np.mean([a["macro_f1"] - b["macro_f1"] for a, b in zip(after, before, strict=True)])
        print(
            f"| {name} | {chosen} | {cell(before, 'macro_f1')} | {cell(after, 'macro_f1')} ({lift:+.3f}) | "
            f"{cell(before, 'accuracy')} | {cell(after, 'accuracy')} |"
        )
    best = max(meta["systems"], key=lambda k: systems[k]["cv"]["summary"]["macro_f1"]["mean"])
    proba = dev_rows(REPORT / "oof" / meta["systems"][best]["file"], ids).probs
    counts = (y[:, None] == classes[None, :]).sum(axis=0) + 1.0
    every = np.arange(len(y))
    print(f"\nPooled out-of-fold curve of the CV winner ({best}; every dev ad's prior: a look, not a choice):\n")
    print("| a | macro-F1 | accuracy |")
    print("|---|---|---|")
    for a in GRID:
        m = scores(y, corrected(proba, counts / counts.sum(), a), classes, every)
        print(f"| {a:.1f} | {m['macro_f1']:.4f} | {m['accuracy']:.4f} |")
    if args.versus:
        compare("quality-cv", args.versus, ids=ids, y=y)


if __name__ == "__main__":
    main()
