"""Issue 21: does the bundle serve what the report measured? The test split's raw ads through `jobembed classify`.

    .venv/bin/jobembed bundle experiments/out/quality-cv-2ep          # seconds (the report's winner/ is fit)
    .venv/bin/python experiments/bundle_check.py --name quality-cv-2ep   # ~2 min on 2 CPU cores

The report scores its CV winner on the test split from the vectors the embed stages cached; a user gets answers from
the bundle instead: raw text in, cleaned by the bundle's cleaner, encoded by the bundle's copy of the encoder, the
bundle's head. This script sends the prepared test split's raw `text` through the command a user runs (`jobembed
classify --input ... --out ...`, a subprocess, abstention off, an empty embedding cache so every ad is encoded) and
compares its top-1 answers with the labels and with the report's own test figures for the bundled system. It chooses
nothing: the configuration was fixed by the CV and its test reading is already in docs/results.md; this is a check
of the serving path (the same answers, up to float noise between batched and cached encodes), not a second reading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import OUT
from sklearn.metrics import accuracy_score, f1_score

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="quality-cv-2ep", help="run folder under experiments/out with a bundle")
    args = parser.parse_args()
    run = OUT / args.name
    bundle = run / "bundle"
    info = json.loads((bundle / "bundle.json").read_text())
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    bundled = metrics["systems"][metrics["bundled"]]["test"]
    test = pd.read_parquet(run / "prepare" / "test.parquet", columns=["id", "text", "label"])

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "test.csv", Path(tmp) / "answers.csv"
        test[["id", "text"]].to_csv(src, index=False)
        command = [
            str(Path(sys.executable).with_name("jobembed")), "classify", "--bundle", str(bundle),
            "--input", str(src), "--out", str(dst), "--min-confidence", "0", "--top-k", "1",
        ]  # fmt: skip
        start = time.perf_counter()
        # An empty embedding cache: the report's cached vectors share the encoder's fingerprint, and would answer.
        env = {**os.environ, "JOBEMBED_CACHE": str(Path(tmp) / "cache")}
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        answers = pd.read_csv(dst, dtype=str)
    predicted = answers["label"].to_numpy()  # classify --out: the input's columns + label, name, confidence, ...
    truth = test["label"].astype(str).to_numpy()
    accuracy = accuracy_score(truth, predicted)
    macro_f1 = f1_score(truth, predicted, average="macro", labels=sorted(set(truth)), zero_division=0)
    print(f"bundle {bundle} ({info['system']}, encoder {info['encoder']['source_ref']}, {info['format']})")
    print(f"classify on the test split's {len(test)} raw ads: {seconds:.0f} s ({1000 * seconds / len(test):.0f} s per "
          "1,000 ads, cleaning + encoding + head, process start included)")  # fmt: skip
    print(f"{'':22s} {'accuracy':>9s} {'macro-F1':>9s}")
    print(f"{'report (cached vectors)':22s} {bundled['accuracy']:9.4f} {bundled['macro_f1']:9.4f}")
    print(f"{'bundle via classify':22s} {accuracy:9.4f} {macro_f1:9.4f}")


if __name__ == "__main__":
    main()
