"""Issue 21, lever 5: the CV winner averaged over fine-tuning seeds (a seed ensemble), chosen on validation.

    .venv/bin/python experiments/seed_ensemble.py     # ~15 min on 2 CPU cores; needs, first:
    .venv/bin/python experiments/quality_cv.py --name quality-cv-prior --folds 3 --prior-power 0.4 --seeds 14 15

The CV winner (fusion of the MLP on the encoder fine-tuned as a classifier with TF-IDF + LR, taxonomy rows at weight
3, prior power 0.4) is one fine-tuning draw, and three draws spread by about a point on test. Averaging the
probabilities of the same system on several fine-tunes is the plainest ensemble of what wins; it costs one encode
per member at prediction. The members are the run's three fine-tunes of the train split: seed 13 (the finetune
stage's, the bundled one) and seeds 14 and 15 (the finetune-seeds stage's), each with fusion fit exactly as the
report fits it (the run's own config, taxonomy rows and prior correction).

The choice, on validation: each seed's fusion fit on the train split alone (its heads hold out their own
repost-grouped slice, as inside a CV fold, so the val split is touched by no fit) and scored on the val split,
alone and as the mean of the members' probabilities (every ordered prefix of the seeds: 1, 2, 3 members). The
rule, fixed before the run: the ensemble of all three is taken when its val macro-F1 beats every single seed's.

The test split, read once for that configuration, only when the rule takes it: each seed's fusion fit on train (val
for early stopping, the report's held-out protocol; each single seed's figure equals its report's), and the
ensemble of their test probabilities: accuracy and macro-F1 with repost-group bootstrap 95% intervals, major-group
accuracy read off the sub-major answer, exact McNemar against seed 13 alone (the bundled system).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import OUT
from quality_cv import REFERENCE, config_for

from jobembed import metrics
from jobembed.evaluate import (
    EvalSettings,
    System,
    _extra_vectors,
    _fit_predict,
    extra_rows,
    find_hierarchy,
    fit_on_train,
    predict_proba,
)
from jobembed.stages import prepared
from jobembed.stages._common import taxonomy_rows
from jobembed.stages.finetune import finetuned_vectors
from jobembed.stages.finetune_seeds import seed_vectors

SYSTEM = "fusion"


def run_config(name: str):
    """quality_cv.py's config of the run folder ``name`` (its defaults, prior power 0.4, seeds 14 and 15)."""
    args = argparse.Namespace(
        name=name, loss="classifier", epochs=1.0, max_seq_length=128, rows_weight=3.0, rows_kinds=None,
        topdown=False, prior_power=0.4, seeds=[14, 15],
    )  # fmt: skip
    return config_for(args, None)


def val_proba(system: System, settings: EvalSettings, labels, splits) -> tuple[np.ndarray, np.ndarray]:
    """``system`` fit on the train split alone (the heads cut their own slice), its val probabilities and classes."""
    v, col, train = system.vectors, settings.text_column, splits["train"]
    texts = splits["val"][col].tolist()
    _, model = _fit_predict(
        system, settings=settings, labels=labels, dev=train, X_dev=v.train, train_idx=np.arange(len(train)),
        val_idx=None, X_eval=v.val, texts_eval=texts, X_extra=_extra_vectors(settings, v.taxonomy),
    )  # fmt: skip
    return predict_proba(system, model, v.val, texts), np.asarray(model.classes_, dtype=str)


def test_proba(system: System, settings: EvalSettings, labels, splits, hierarchy) -> tuple[np.ndarray, np.ndarray]:
    """``system`` fit as the report fits it for the test split, its test probabilities and classes."""
    _, model = fit_on_train(system, settings=settings, labels=labels, splits=splits, hierarchy=hierarchy)
    texts = splits["test"][settings.text_column].tolist()
    return predict_proba(system, model, system.vectors.test, texts), np.asarray(model.classes_, dtype=str)


def scores(y: np.ndarray, pred: np.ndarray) -> str:
    m = metrics.classification_metrics(y, pred, min_support=5)
    return f"{m['macro_f1']:.3f} | {m['accuracy']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="quality-cv-prior", help="the run folder under experiments/out/")
    args = ap.parse_args()
    config = run_config(args.name)
    assert config.run_dir == OUT / args.name
    splits, labels = prepared(config)
    settings = EvalSettings.of(config, extra_rows(config, taxonomy_rows(config)))
    main_vectors = finetuned_vectors(config, splits, labels)
    members = {config.finetune.seed: main_vectors} | {
        seed: v for seed, (v, _) in seed_vectors(config, splits, like=main_vectors).items()
    }
    systems = {seed: System(SYSTEM, v) for seed, v in members.items()}
    t0 = time.perf_counter()

    y_val = splits["val"]["label"].to_numpy(dtype=str)
    val = {seed: val_proba(s, settings, labels, splits) for seed, s in systems.items()}
    classes = next(iter(val.values()))[1]
    assert all(np.array_equal(c, classes) for _, c in val.values())
    print(f"validation ({len(y_val)} ads; fusion fit on train alone; {time.perf_counter() - t0:.0f} s)\n")
    print("| members | val macro-F1 | val accuracy |\n|---|---|---|")
    singles = {}
    for seed, (p, _) in val.items():
        singles[seed] = metrics.classification_metrics(y_val, classes[p.argmax(axis=1)], min_support=5)["macro_f1"]
        print(f"| seed {seed} | {scores(y_val, classes[p.argmax(axis=1)])} |")
    seeds = list(val)
    for n in range(2, len(seeds) + 1):
        mean = np.mean([val[s][0] for s in seeds[:n]], axis=0)
        print(f"| mean of seeds {' + '.join(map(str, seeds[:n]))} | {scores(y_val, classes[mean.argmax(axis=1)])} |")
    ensemble_f1 = metrics.classification_metrics(
        y_val, classes[np.mean([p for p, _ in val.values()], axis=0).argmax(axis=1)], min_support=5
    )["macro_f1"]
    taken = ensemble_f1 > max(singles.values())
    print(f"\nrule: the {len(seeds)}-seed mean beats every single seed on val macro-F1: {taken}")
    if not taken:
        print("the test split is not read")
        return

    t1 = time.perf_counter()
    test = splits["test"]
    y_test, groups = test["label"].to_numpy(dtype=str), test["group"].to_numpy()
    hierarchy = find_hierarchy(
        labels["label"].astype(str).tolist() + list(splits["train"]["label"].astype(str)) + list(y_val),
        mode=settings.report.hierarchy,
    )
    out = {seed: test_proba(s, settings, labels, splits, hierarchy) for seed, s in systems.items()}
    assert all(np.array_equal(c, classes) for _, c in out.values())
    preds = {f"seed {seed}": classes[p.argmax(axis=1)] for seed, (p, _) in out.items()}
    preds["mean of seeds " + " + ".join(map(str, seeds))] = classes[
        np.mean([p for p, _ in out.values()], axis=0).argmax(axis=1)
    ]
    print(f"\ntest ({len(y_test)} ads, read once for this configuration; {time.perf_counter() - t1:.0f} s)\n")
    print("| members | test accuracy [95% CI] | test macro-F1 [95% CI] | major accuracy | McNemar p vs seed 13 |")
    print("|---|---|---|---|---|")
    base = preds[f"seed {config.finetune.seed}"]
    for name, pred in preds.items():
        m = metrics.classification_metrics(y_test, pred, min_support=5)
        ci = {
            k: metrics.bootstrap_ci(y_test, pred, fn, groups=groups, n_resamples=settings.report.bootstrap)
            for k, fn in (("accuracy", metrics.accuracy), ("macro_f1", metrics.macro_f1))
        }
        major = metrics.accuracy(hierarchy.parent_of(y_test), hierarchy.parent_of(pred))
        p = "" if pred is base else f"{metrics.mcnemar(y_test, base, pred)['p_value']:.3g}"
        print(
            f"| {name} | {m['accuracy']:.3f} [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}] | "
            f"{m['macro_f1']:.3f} [{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}] | {major:.3f} | {p} |"
        )
    print(f"\nreference: {REFERENCE}")


if __name__ == "__main__":
    main()
