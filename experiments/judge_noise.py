"""How well the offline ``model`` judge of triplets finds mislabelled ads: flip a known 10% of the training
labels of pl-jobads and measure the precision and recall of the ads it flags.

    .venv/bin/python experiments/judge_noise.py            # all 8,006 ads, ISCO sub-major groups, ~10 min on 2 CPUs

The run is prepare -> clean (rules) -> embed (builtin e5-small, 256 tokens) with the seed every experiment uses;
only the training split is read (the test split is not touched). Two kinds of flips, each 10% of the training
ads, seeded:

- ``uniform``: the new label is any other class (the usual benchmark of label-error finders);
- ``confusable``: the new label is the class whose centroid is nearest to the ad's own class (the kind of error
  an annotator makes; harder to find).

The judge is ``jobembed.triplets.core.label_models``: out-of-fold probabilities (5 folds) of logistic regression
on the frozen embeddings, with and without TF-IDF + LR averaged in, then ``cleanlab.filter.find_label_issues``.
Precision = flipped among flagged; recall = flagged among flipped. The pl-jobads labels themselves carry noise
(experts agree on 87% at one digit), so some "false" flags are real errors: precision is a lower bound. For
reference, the flags on the unflipped labels are counted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from common import OUT, pl_jobads

from jobembed.config import load_config
from jobembed.sections import NoiseFilter
from jobembed.stages import pin_models, run_stages, triplet_inputs
from jobembed.triplets import core


def flip(
    labels: np.ndarray, vectors: np.ndarray, *, share: float, kind: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(new labels, indices flipped)``: ``share`` of the ads get another class (uniform or the nearest one)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    flipped = rng.choice(len(labels), size=round(share * len(labels)), replace=False)
    out = labels.copy()
    if kind == "uniform":
        for i in flipped:
            out[i] = rng.choice(classes[classes != labels[i]])
        return out, flipped
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centroids = np.stack([unit[labels == c].mean(axis=0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    similarity = centroids @ centroids.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = {c: classes[similarity[k].argmax()] for k, c in enumerate(classes)}
    for i in flipped:
        out[i] = nearest[labels[i]]
    return out, flipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--share", type=float, default=0.10)
    ap.add_argument("--max-rows", type=int, default=None)
    args = ap.parse_args()
    overrides = {
        "name": f"judge-noise-{args.label}" + (f"-{args.max_rows}" if args.max_rows else ""),
        "runs_dir": str(OUT),
        "prepare": pl_jobads(args.label, max_rows=args.max_rows),
        "clean": {"backend": "rules", "language": "pl"},
        "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256},
    }
    config = pin_models(load_config(None, overrides))
    run_stages(config, target="embed", progress=False)
    inputs = triplet_inputs(config)
    train = inputs.frames["train"]
    truth = train["label"].to_numpy(dtype=str)
    results: dict = {"train_ads": len(train), "share": args.share, "rows": []}
    filters = [f.value for f in NoiseFilter]
    for tfidf in (False, True):
        triplets = config.triplets.model_copy(update={"model_tfidf": tfidf})
        view = "embeddings + TF-IDF" if tfidf else "embeddings"
        for kind in ("none", "uniform", "confusable"):
            if kind == "none":
                noisy, flipped = truth, np.array([], dtype=int)
            else:
                noisy, flipped = flip(truth, inputs.vectors["train"], share=args.share, kind=kind, seed=13)
            frames = dict(inputs.frames)
            frames["train"] = train.assign(label=noisy)
            noisy_inputs = dataclasses.replace(inputs, frames=frames)
            started = time.perf_counter()
            probs = core.label_probs(noisy_inputs, triplets)  # once per view and flip; the filters reuse it
            seconds = round(time.perf_counter() - started, 1)
            for noise_filter in filters:
                model = core.label_models(
                    noisy_inputs, triplets.model_copy(update={"noise_filter": noise_filter}), probs
                )["train"]
                flagged = set(np.flatnonzero(model.flagged))
                hit = flagged & set(flipped.tolist())
                suggested = model.suggested()
                precision = len(hit) / max(len(flagged), 1)
                recall = len(hit) / len(flipped) if len(flipped) else float("nan")
                results["rows"].append(
                    {
                        "judge": view,
                        "filter": noise_filter,
                        "flips": kind,
                        "flipped": len(flipped),
                        "flagged": len(flagged),
                        "precision": round(precision, 3) if len(flipped) else None,
                        "recall": round(recall, 3) if len(flipped) else None,
                        "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 3)
                        if len(flipped)
                        else None,
                        "true_label_suggested": round(float(np.mean([suggested[i] == truth[i] for i in hit])), 3)
                        if hit
                        else None,
                        "probs_seconds": seconds,
                    }
                )
                print(json.dumps(results["rows"][-1]), flush=True)
    (OUT / "judge_noise.json").write_text(json.dumps(results, indent=2))
    print("\n| judge | filter | flips | flipped | flagged | precision | recall | F1 | true label suggested |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        cells = [r["judge"], r["filter"], r["flips"], r["flipped"], r["flagged"], r["precision"], r["recall"], r["f1"]]
        cells.append(r["true_label_suggested"])
        print("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    for view in ("embeddings", "embeddings + TF-IDF"):
        for noise_filter in filters:
            f1 = [r["f1"] for r in results["rows"] if r["judge"] == view and r["filter"] == noise_filter and r["f1"]]
            print(f"mean F1 over the two flip kinds, {view}, {noise_filter}: {np.mean(f1):.3f}")


if __name__ == "__main__":
    main()
