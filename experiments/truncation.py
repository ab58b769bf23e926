"""What truncation costs: token lengths of real ads, encode time per length (cold), CV macro-F1 per length.

    .venv/bin/python experiments/truncation.py [--max-rows 2000] [--lengths 128,256,512] [--timing-n 300]

1. Token counts of every pl-jobads ad with the XLM-R tokenizer of builtin e5-small ("query: " included):
   the share of ads longer than each length, i.e. how many ads lose text.
2. Encode time, cold: the same --timing-n ads encoded at each length with the model already loaded and an
   empty embedding cache (a fresh temporary folder per length), one run each, in one process.
3. CV: the same stratified 2,000-ad subsample at each length (the stage graph: prepare -> embed ->
   report with centroid, LR and MLP), 5-fold CV on the dev pool; these runs use the shared cache.
Prints the table of docs/truncation.md; raw numbers go to experiments/out/truncation.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import DATA, OUT, pl_jobads

from jobembed import encoders
from jobembed.config import load_config
from jobembed.embed import Embedder
from jobembed.sections import EmbedConfig
from jobembed.stages import run_stages

MODEL = "builtin:multilingual-e5-small"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--timing-n", type=int, default=300)
    args = ap.parse_args()
    ads = pd.read_csv(DATA / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = encoders.load_encoder(MODEL, device="cpu")
    counts = np.array([len(model.tokenizer("query: " + t)["input_ids"]) for t in ads["text"]])
    out = {
        "tokens": {
            "mean": float(counts.mean()),
            "median": float(np.median(counts)),
            "p90": float(np.percentile(counts, 90)),
            "share_longer_than": {n: float((counts > n).mean()) for n in lengths},
        },
        "encode_seconds_cold": {},
        "runs": {},
    }
    print(json.dumps(out["tokens"], indent=2), flush=True)
    texts = ads["text"].drop_duplicates().sample(args.timing_n, random_state=7).tolist()
    for n in lengths:
        encoders.load_encoder(MODEL, device="cpu", max_seq_length=n)  # load outside the timed part
        with tempfile.TemporaryDirectory() as cache:
            embedder = Embedder(EmbedConfig(model=MODEL, max_seq_length=n, device="cpu", cache_dir=Path(cache)))
            embedder.model  # noqa: B018 - the model is in memory before timing starts
            t0 = time.perf_counter()
            embedder.encode(texts)
            out["encode_seconds_cold"][n] = time.perf_counter() - t0
        print(f"encode {args.timing_n} ads at {n} tokens, cold: {out['encode_seconds_cold'][n]:.1f} s", flush=True)
    for n in lengths:
        config = load_config(
            None,
            {
                "name": f"trunc-{args.label}-{n}-{args.max_rows}",
                "runs_dir": str(OUT),
                "prepare": pl_jobads(args.label, max_rows=args.max_rows),
                "embed": {"model": MODEL, "max_seq_length": n},
                "report": {"systems": ["centroid", "logreg", "mlp"], "cv_folds": 5, "bootstrap": 200},
            },
        )
        run_stages(config, target="report", progress=False)
        metrics = json.loads((config.run_dir / "report" / "metrics.json").read_text())
        out["runs"][n] = {
            r["system"]: {m: r["cv"]["summary"][m] for m in ("macro_f1", "accuracy", "macro_f1_min_support")}
            for r in metrics["systems"].values()
        }
        print(n, json.dumps(out["runs"][n]), flush=True)
    base = out["encode_seconds_cold"].get(256)
    print(
        "\n| max_seq_length | ads longer | encode s (cold) | time vs 256 | centroid CV macro-F1 | LR CV macro-F1 |"
        " MLP CV macro-F1 | MLP CV accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in lengths:
        r, sec = out["runs"][n], out["encode_seconds_cold"][n]

        def f(system: str, metric: str = "macro_f1", r: dict = r) -> str:
            return f"{r[system][metric]['mean']:.3f} ± {r[system][metric]['std']:.3f}"

        ratio = f"{sec / base:.2f}×" if base else "–"
        print(
            f"| {n} | {out['tokens']['share_longer_than'][n]:.0%} | {sec:.1f} | {ratio} | {f('centroid')} | "
            f"{f('logreg')} | {f('mlp')} | {f('mlp', 'accuracy')} |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "truncation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
