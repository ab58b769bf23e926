"""Issue 22, item 4: torch fp32 vs ONNX int8 vectors for the whole pipeline (`embed.backend`), on this CPU.

    .venv/bin/python experiments/int8_vectors.py              # ~10 min on 2 CPU cores
    .venv/bin/python experiments/int8_vectors.py --encode-only --rows 500

pl-jobads `isco_submajor`, the settings of experiments/finetune_cv.py (rules-cleaned text, builtin e5-small at 256
tokens, the seed-13 splits). Two measurements:

1. Encode time: the same ads (``--rows``, a seeded sample of the dev pool's cleaned texts, longest ones included) with
   the cache off, torch fp32 vs the int8 ONNX export (the export itself, paid once per encoder, timed apart), each
   after one warm-up batch; texts/s and the cosine between the two vectors of an ad.
2. Quality: the 6,248 dev ads encoded both ways (the int8 ones in a run folder of their own, `embed.backend:
   onnx-int8`), then the MLP head and fusion cross-validated on both with the report's code, the same 3
   repost-grouped folds; CV macro-F1 mean ± sd, the difference and the corrected t-test. The test split is not read.

The decision rule (the issue's): int8 becomes the CPU default only if |Δ macro-F1| ≤ 0.01 and the corrected t-test
p > 0.05 for both systems. It prints the CPU's flags that matter for int8 (avx2, avx512*, vnni, amx).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from common import OUT
from finetune_cv import config_for as finetune_cv_config

from jobembed import metrics
from jobembed.config import load_config
from jobembed.embed import Embedder
from jobembed.evaluate import EvalSettings, System, cross_validate, cv_folds, dev_pool
from jobembed.stages import pin_models, prepared, run_stages, run_vectors

FOLDS = 3
RESULTS = OUT / "int8_vectors.json"


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return [f for f in wanted if f in line.split()]


def config_for(backend: str):
    base = finetune_cv_config(None).model_dump(mode="json")
    base["name"] = "int8" if backend == "onnx-int8" else base["name"]
    base["embed"]["backend"] = backend
    base["report"] = {"cv_folds": FOLDS, "bootstrap": 0}
    base["finetune"], base["triplets"] = {}, {}
    return pin_models(load_config(None, base))


def encode_speed(rows: int) -> dict:
    config = config_for("torch")
    run_stages(config, target="clean", progress=False)
    splits, _ = prepared(config)
    texts = dev_pool(splits)[str(config.text_column)].sample(n=rows, random_state=13).tolist()
    out = {}
    vectors = {}
    for backend in ("torch", "onnx-int8"):
        embedder = Embedder(config.embed, prompt="query: ", backend=backend, cache=False)
        started = time.perf_counter()
        embedder.model  # noqa: B018 - loads (and for int8 exports or reads the cached export)
        load = time.perf_counter() - started
        embedder.encode(texts[:16])
        started = time.perf_counter()
        vectors[backend] = embedder.encode(texts)
        seconds = time.perf_counter() - started
        out[backend] = {"load_s": round(load, 1), "seconds": round(seconds, 1), "texts_per_s": round(rows / seconds, 2)}
    cosine = (vectors["torch"] * vectors["onnx-int8"]).sum(axis=1)
    out["cosine"] = {"mean": float(cosine.mean()), "min": float(cosine.min()), "p01": float(np.quantile(cosine, 0.01))}
    out["speed_ratio"] = round(out["onnx-int8"]["texts_per_s"] / out["torch"]["texts_per_s"], 2)
    return out


def quality() -> dict:
    out = {}
    results = {}
    for backend in ("torch", "onnx-int8"):
        config = config_for(backend)
        started = time.perf_counter()
        run_stages(config, target="embed", progress=False)
        splits, labels = prepared(config)
        vectors = run_vectors(config, config.embed.model, splits, labels)
        dev = dev_pool(splits)
        folds = cv_folds(dev, n_folds=FOLDS, seed=config.prepare.seed)
        X = np.concatenate([vectors.train, vectors.val])
        for name in ("mlp", "fusion"):
            fold_metrics, *_ = cross_validate(
                System(name, vectors, "e5"), settings=EvalSettings.of(config), labels=labels, dev=dev, X_dev=X,
                folds=folds,
            )  # fmt: skip
            results[(backend, name)] = [f["macro_f1"] for f in fold_metrics]
        out[f"{backend}_seconds"] = round(time.perf_counter() - started, 1)
        n_dev = len(dev)
    for name in ("mlp", "fusion"):
        a, b = results[("onnx-int8", name)], results[("torch", name)]
        test = metrics.corrected_paired_ttest(a, b, n_train=n_dev - n_dev // FOLDS, n_test=n_dev // FOLDS)
        out[name] = {
            "torch": {"mean": float(np.mean(b)), "std": float(np.std(b, ddof=1)), "folds": b},
            "onnx-int8": {"mean": float(np.mean(a)), "std": float(np.std(a, ddof=1)), "folds": a},
            "diff": test["mean_diff"],
            "p_value": test["p_value"],
        }
    out["int8_default"] = all(abs(out[n]["diff"]) <= 0.01 and out[n]["p_value"] > 0.05 for n in ("mlp", "fusion"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--encode-only", action="store_true")
    args = ap.parse_args()
    result = {"machine": platform.machine(), "cpu_flags": cpu_flags(), "encode": encode_speed(args.rows)}
    if not args.encode_only:
        result["quality"] = quality()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
