"""The whole ad or its first tokens: chunked encoding (mean of windows) against truncation at 256 and 512.

    .venv/bin/python experiments/chunking.py                       # raw and cleaned text, 2,000-ad sample
    .venv/bin/python experiments/chunking.py --texts clean_text --max-rows 0   # cleaned text, all ads

For each text column (raw ``text``; ``clean_text`` from the rules cleaner, the default) and each encoding
(truncate at 256, truncate at 512, ``chunking: mean`` with 256-token windows 192 apart), the stage graph runs
prepare -> clean -> embed -> report (centroid, MLP) on the same stratified sample, the same splits and
the same 5 CV folds; encodings are compared by a corrected paired t-test over the folds of the dev pool.
Encode time is measured cold (an empty cache, the model loaded) on the same --timing-n ads for each encoding,
in one process. Prints the table of docs/results.md#the-whole-ad; raw numbers in experiments/out/chunking-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import OUT, pl_jobads

from jobembed import encoders
from jobembed.config import load_config
from jobembed.embed import Embedder
from jobembed.metrics import corrected_paired_ttest
from jobembed.sections import EmbedConfig
from jobembed.stages import run_stages

MODEL = "builtin:multilingual-e5-small"
ENCODINGS = {
    "truncate-256": {"max_seq_length": 256},
    "truncate-512": {"max_seq_length": 512},
    "chunks-256": {"max_seq_length": 256, "chunking": "mean", "chunk_stride": 192},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--texts", default="text,clean_text")
    ap.add_argument("--max-rows", type=int, default=2000, help="stratified sample; 0 = every ad")
    ap.add_argument("--timing-n", type=int, default=200)
    ap.add_argument("--encodings", default=",".join(ENCODINGS), help="a subset of " + ", ".join(ENCODINGS))
    ap.add_argument("--summary", action="store_true", help="print the table of an earlier run's JSON and stop")
    args = ap.parse_args()
    if args.summary:
        print_table(json.loads((OUT / f"chunking-{args.max_rows or 'all'}.json").read_text()), args.timing_n)
        return
    encodings = {k: ENCODINGS[k] for k in args.encodings.split(",")}
    max_rows = args.max_rows or None
    out: dict = {"runs": {}, "encode_seconds_cold": {}}
    for column in args.texts.split(","):
        for name, embed in encodings.items():
            config = load_config(
                None,
                {
                    "name": f"chunking-{column}-{name}-{args.label}-{max_rows or 'all'}",
                    "runs_dir": str(OUT),
                    "text_column": column,
                    "prepare": pl_jobads(args.label, max_rows=max_rows),
                    "clean": {"backend": "rules", "language": "pl"},
                    "embed": {"model": MODEL, **embed},
                    "report": {"systems": ["centroid", "mlp"], "cv_folds": 5, "bootstrap": 200},
                },
            )
            run_stages(config, target="report", progress=False)
            m = json.loads((config.run_dir / "report" / "metrics.json").read_text())
            out["runs"][f"{column}/{name}"] = {
                r["system"]: {"folds": [f["macro_f1"] for f in r["cv"]["folds"]], "cv": r["cv"]["summary"]}
                for r in m["systems"].values()
            }
            out["n_dev"] = m["data"]["train"] + m["data"]["val"]
            print(f"{column}/{name}: done", flush=True)
            if name == "truncate-256":
                stage = "clean" if column == "clean_text" else "prepare"
                texts = pd.read_parquet(config.run_dir / stage / "train.parquet")[column]
                sample = texts.drop_duplicates().sample(min(args.timing_n, len(texts)), random_state=7).tolist()
        for name, embed in encodings.items():
            encoders.load_encoder(MODEL, device="cpu", max_seq_length=embed["max_seq_length"])
            with tempfile.TemporaryDirectory() as cache:
                emb = Embedder(EmbedConfig(model=MODEL, device="cpu", cache_dir=Path(cache), **embed), prompt="query: ")
                emb.model  # noqa: B018 - loaded before timing
                t0 = time.perf_counter()
                emb.encode(sample)
                out["encode_seconds_cold"][f"{column}/{name}"] = time.perf_counter() - t0
                windows = sum(len(emb.chunks(t)) for t in sample) if embed.get("chunking") else len(sample)
                out.setdefault("windows", {})[f"{column}/{name}"] = windows
            print(f"{column}/{name}: {out['encode_seconds_cold'][f'{column}/{name}']:.1f} s cold", flush=True)
    print_table(out, args.timing_n)
    (OUT / f"chunking-{max_rows or 'all'}.json").write_text(json.dumps(out, indent=2))


def print_table(out: dict, timing_n: int) -> None:
    n_dev = out["n_dev"]
    print(
        f"\n| text | encoding | windows per ad | encode s, {timing_n} ads (cold) | time vs truncate-256 | "
        "centroid CV macro-F1 | vs truncate-256 (p) | MLP CV macro-F1 | vs truncate-256 (p) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, run in out["runs"].items():
        column, name = key.split("/")
        base = out["runs"][f"{column}/truncate-256"]
        sec, base_sec = out["encode_seconds_cold"][key], out["encode_seconds_cold"][f"{column}/truncate-256"]
        cells = []
        for system in ("centroid", "mlp"):
            s = run[system]["cv"]["macro_f1"]
            a, b = np.array(run[system]["folds"]), np.array(base[system]["folds"])
            versus = "" if key.endswith("truncate-256") else _versus(a, b, n_dev)
            cells += [f"{s['mean']:.3f} ± {s['std']:.3f}", versus]
        windows = out.get("windows", {}).get(key, timing_n) / timing_n
        print(f"| {column} | {name} | {windows:.2f} | {sec:.1f} | {sec / base_sec:.2f}× | " + " | ".join(cells) + " |")


def _versus(a: np.ndarray, b: np.ndarray, n_dev: int) -> str:
    t = corrected_paired_ttest(a, b, n_train=n_dev * (1 - 1 / len(a)), n_test=n_dev / len(a))
    return f"{a.mean() - b.mean():+.3f} ({t['p_value']:.2f})"


if __name__ == "__main__":
    main()
