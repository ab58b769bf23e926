"""How the MLP head's defaults (and TF-IDF's max_features) were chosen: 5-fold CV on the dev pool only.

    .venv/bin/python experiments/head_ablation.py            # the MLP table in docs/results.md
    .venv/bin/python experiments/head_ablation.py --tfidf    # TF-IDF + LR at 50k vs 200k features per vectorizer

pl-jobads, isco_submajor, builtin e5-small at 256 tokens: the same prepared run and vectors as
experiments/cv_results.py (experiments/out/isco_submajor-256), the same stratified, repost-grouped folds
over train + val for every variant. The test split is never loaded for scoring here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from common import OUT, pl_jobads

from jobembed import data, embed
from jobembed.config import load_config
from jobembed.evaluate import EvalSettings, System, cross_validate, cv_folds
from jobembed.metrics import corrected_paired_ttest, summarize_folds
from jobembed.stages import run_stages

FIRST = {"hidden_sizes": [512], "dropout": 0.2, "learning_rate": 1e-3, "standardize": False}
MLP_VARIANTS = {
    "hidden 512, dropout 0.2, lr 1e-3, no standardisation (first version)": FIRST,
    "+ z-scored inputs": {**FIRST, "standardize": True},
    "+ dropout 0.5, lr 3e-4 (default)": {},
    "default without z-scoring": {"standardize": False},
    "hidden 1024": {"hidden_sizes": [1024]},
    "class_weight none": {"class_weight": "none"},
    "class_weight balanced": {"class_weight": "balanced"},
}
TFIDF_VARIANTS = {"50k + 50k features (default)": {}, "200k + 200k features": {"max_features": 200_000}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tfidf", action="store_true", help="compare TF-IDF max_features instead of MLP variants")
    ap.add_argument("--label", default="isco_submajor", choices=["isco_submajor", "isco_major"])
    args = ap.parse_args()
    base = {
        "name": f"{args.label}-256",
        "runs_dir": str(OUT),
        "prepare": pl_jobads(args.label),
        "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256, "batch_size": 32},
        "report": {"cv_folds": 5},
    }
    config = load_config(None, base)
    run_stages(config, target="embed", progress=False)
    splits = data.load_splits(config.run_dir / "prepare")
    labels = data.load_labels(config.run_dir / "prepare")
    dev = pd.concat([splits["train"], splits["val"]], ignore_index=True)
    folds = cv_folds(dev, n_folds=5, seed=config.prepare.seed)
    if args.tfidf:
        system, X_dev, variants, section = System("tfidf"), None, TFIDF_VARIANTS, "report.tfidf"
    else:
        vec = embed.load_vectors(
            config.run_dir / "embed",
            model=config.embed.model,
            config=config.embed,
            splits=splits,
            labels=labels,
            text_column=config.text_column,
        )
        X_dev = np.concatenate([vec.train, vec.val])
        system, variants, section = System("mlp", vec, "e5"), MLP_VARIANTS, "head"
    print(f"{len(dev)} dev ads (train + val), {len(folds)} folds, {dev['label'].nunique()} classes")
    results, seconds = {}, {}
    for name, change in variants.items():
        cfg = load_config(None, {**base, **{f"{section}.{k}": v for k, v in change.items()}})
        t0 = time.perf_counter()
        results[name], *_ = cross_validate(  # fold metrics; the out-of-fold answers are not needed here
            system, settings=EvalSettings.of(cfg), labels=labels, dev=dev, X_dev=X_dev, folds=folds
        )
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {summarize_folds(results[name])['macro_f1']}", flush=True)
    default = next(k for k in variants if "(default)" in k)
    print("| variant | CV macro-F1 | CV accuracy | macro-F1 vs default (corrected t-test p) | seconds (5 fits) |")
    print("|---|---|---|---|---|")
    fold = len(dev) / len(folds)
    for name, folds_metrics in results.items():
        s = summarize_folds(folds_metrics)
        cmp = "–"
        if name != default:
            t = corrected_paired_ttest(
                [f["macro_f1"] for f in folds_metrics],
                [f["macro_f1"] for f in results[default]],
                n_train=int(len(dev) - fold),
                n_test=int(fold),
            )
            cmp = f"{t['mean_diff']:+.3f} (p = {t['p_value']:.2g})"
        print(
            f"| {name} | {s['macro_f1']['mean']:.3f} ± {s['macro_f1']['std']:.3f} | "
            f"{s['accuracy']['mean']:.3f} ± {s['accuracy']['std']:.3f} | {cmp} | {seconds[name]:.0f} |"
        )


if __name__ == "__main__":
    main()
