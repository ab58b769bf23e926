"""What truncation costs: token lengths of real ads, and CV macro-F1 at several max_seq_length values.

    .venv/bin/python experiments/truncation.py [--max-rows 2000] [--lengths 128,256,512]

1. Token counts of every pl-jobads ad with the XLM-R tokenizer of builtin e5-small ("query: " prefix
   included): share of ads longer than each length, i.e. how many ads lose text.
2. The same stratified subsample embedded at each length; 5-fold CV of centroid cosine, logistic regression
   and the MLP head (jobembed's compare-report on identical splits); time to embed per length.
Results go to docs/truncation.md by hand; raw numbers to experiments/out/truncation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from jobembed import encoders
from jobembed.config import load_config
from jobembed.pipeline import run_compare_report, run_prepare

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JOBEMBED_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--label", default="isco_submajor")
    args = ap.parse_args()
    ads = pd.read_csv(DATA / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)
    model = encoders.load_encoder("builtin:multilingual-e5-small", device="cpu")
    counts = np.array([len(model.tokenizer("query: " + t)["input_ids"]) for t in ads["text"]])
    lengths = [int(x) for x in args.lengths.split(",")]
    out = {
        "tokens": {
            "mean": float(counts.mean()),
            "median": float(np.median(counts)),
            "p90": float(np.percentile(counts, 90)),
            "share_longer_than": {n: float((counts > n).mean()) for n in lengths},
        },
        "runs": {},
    }
    print(json.dumps(out["tokens"], indent=2), flush=True)
    for n in lengths:
        overrides = {
            "name": f"trunc-{args.label}-{n}-{args.max_rows}",
            "runs_dir": str(ROOT / "experiments" / "out"),
            "prepare": {
                "input": str(DATA / "pl-jobads" / "ads.csv"),
                "text_col": "text",
                "label_col": args.label,
                "id_col": "id",
                "min_class_count": 1,
                "max_rows": args.max_rows,
                "seed": 13,
            },
            "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": n},
            "report": {"systems": ["centroid", "logreg", "mlp"], "cv_folds": 5, "bootstrap": 200},
        }
        config = load_config(None, overrides)
        run_prepare(config, progress=False)
        t0 = time.perf_counter()
        metrics = run_compare_report(config, progress=False)
        took = time.perf_counter() - t0
        out["runs"][n] = {
            "seconds": took,
            **{
                r["system"]: {m: r["cv"]["summary"][m] for m in ("macro_f1", "accuracy", "macro_f1_min_support")}
                for r in metrics["systems"].values()
            },
        }
        print(n, json.dumps(out["runs"][n]), flush=True)
    (ROOT / "experiments" / "out" / "truncation.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
