"""Load on a real ``jobembed serve`` over loopback: texts/s and latency, micro-batching on/off, torch vs ONNX int8.

    .venv/bin/python experiments/bench_serve.py                     # CPU: the table of docs/benchmarks.md#serve
    .venv/bin/python experiments/bench_serve.py --device cuda --backends torch   # on a GPU (batching on vs off)

1. Bundles late fusion of TF-IDF + LR and the MLP head, the CV winner of experiments/quality.py, on that run's data
   and settings (pl-jobads ISCO sub-major, rules-cleaned text, builtin multilingual-e5-small at 256 tokens): the
   bundle a portal would serve.
2. Quality of the int8 export: macro-F1 and accuracy of the bundle on the test split with the torch encoder and with
   the ONNX int8 encoder, same head (the int8 vectors are not cached: the cache is off).
3. For each backend x batching on/off, one server process (``--no-cache``: every text is encoded), then a closed-loop
   httpx asyncio client at concurrency 1, 8 and 32 sending one real ad per request, each request a different
   ad (never a repeat, so nothing could be answered from a cache). The baseline is the plain way (the original
   project's): torch, one encode call per request (batching off).
4. Memory: one server (the fastest backend, batching on, cache off) answers --memory-requests single-ad requests
   drawn with repetition at concurrency 8; its resident memory is sampled every 1,000 requests.

The load generator runs on the same 2 cores as the server (its share is small: JSON and sockets), so absolute
texts/s are a lower bound; the ratios compare like with like. Raw numbers: experiments/out/bench_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
from common import OUT
from quality import quality_config

from jobembed.bundle import load_bundle
from jobembed.config import load_config
from jobembed.pipeline import run_stages


def build_bundle(label: str) -> tuple[Path, Path]:
    """A bundle of late fusion (TF-IDF + LR with the MLP head), the CV winner of experiments/quality.py, on the same
    data and settings as that run; only fusion is cross-validated here (2 folds: the ranking is not the point)."""
    base = quality_config(label)
    config = load_config(
        None,
        {
            **base.model_dump(mode="json", exclude={"name", "report"}),
            "name": f"serve-bench-{label}",
            "report": {"systems": ["fusion"], "cv_folds": 2, "bootstrap": 50},
        },
    )
    run_stages(config, target="bundle", progress=False)
    return config.run_dir / "bundle", config.run_dir


def quality(bundle_dir: Path, run_dir: Path) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    test = pd.read_parquet(run_dir / "prepare" / "test.parquet")
    out = {"n_test": len(test)}
    for backend in ("torch", "onnx-int8"):
        bundle = load_bundle(bundle_dir, device="cpu", backend=backend, cache=backend == "torch")
        t0 = time.perf_counter()
        proba = bundle.predict_proba(test["text"].tolist())
        pred = np.asarray(bundle.head.classes_)[proba.argmax(axis=1)]
        y = test["label"].astype(str).to_numpy()
        out[backend] = {
            "macro_f1": float(f1_score(y, pred, average="macro")),
            "accuracy": float(accuracy_score(y, pred)),
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"quality {backend}: macro-F1 {out[backend]['macro_f1']:.4f}, acc {out[backend]['accuracy']:.4f}",
            flush=True,
        )
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, *args: str) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = OUT / f"bench_serve-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobembed", "serve", "--bundle", str(bundle), "--port", str(self.port), *args],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600  # the first ONNX start exports the model
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit("server not ready")

    def rss_mb(self) -> float:
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, texts: list[str], concurrency: int) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next text as soon as the last answer came."""
    latencies: list[float] = []
    errors = 0
    it = iter(texts)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for text in it:
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/classify", json={"texts": [text]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "texts_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def batch_totals(url: str) -> tuple[float, float]:
    """(texts, encode calls) so far, from the server's /metrics."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    get = lambda name: float(next(x.split()[-1] for x in lines if x.startswith(name)))  # noqa: E731
    return get("jobembed_batch_texts_sum"), get("jobembed_batch_texts_count")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="isco_submajor")
    ap.add_argument("--backends", default="torch,onnx-int8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level (at least 4x it)")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()

    bundle_dir, run_dir = build_bundle(args.label)
    out: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": datetime.now(UTC).date().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "bundle": str(bundle_dir),
        "device": args.device,
    }
    if not args.skip_quality and args.device == "cpu":
        out["quality"] = quality(bundle_dir, run_dir)
    pool = (
        pd.read_parquet(run_dir / "prepare" / "train.parquet")["text"].drop_duplicates().sample(frac=1, random_state=3)
    )
    pool = pool.tolist()
    levels = [int(c) for c in args.concurrency.split(",")]
    out["load"] = []
    used = 0
    for backend in args.backends.split(","):
        for batching in (False, True):
            flags = ["--backend", backend, "--no-cache", "--device", args.device]
            flags.append("--batching" if batching else "--no-batching")
            server = Server(bundle_dir, *flags)
            try:
                asyncio.run(load(server.url, pool[:8], 4))  # warm the threads and connections; not counted
                for c in levels:
                    n = max(args.requests, 4 * c)
                    texts, used = pool[used : used + n], used + n
                    if len(texts) < n:
                        used, texts = n, pool[:n]
                    texts0, calls0 = batch_totals(server.url)
                    r = asyncio.run(load(server.url, texts, c))
                    texts1, calls1 = batch_totals(server.url)
                    mean_batch = (texts1 - texts0) / max(calls1 - calls0, 1)
                    r.update(backend=backend, batching=batching, concurrency=c, mean_batch=mean_batch)
                    out["load"].append(r)
                    print(
                        f"{backend:9s} batching {'on ' if batching else 'off'} c={c:2d}: "
                        f"{r['texts_per_s']:6.1f} texts/s"
                        f"  p50 {r['p50_ms']:7.0f}  p95 {r['p95_ms']:7.0f}  p99 {r['p99_ms']:7.0f} ms"
                        f"  errors {r['errors']}",
                        flush=True,
                    )
            finally:
                server.stop()
    if args.memory_requests:
        fastest = max(out["load"], key=lambda r: r["texts_per_s"])
        server = Server(bundle_dir, "--backend", fastest["backend"], "--no-cache", "--device", args.device)
        try:
            rng = np.random.default_rng(0)
            drawn = [pool[i] for i in rng.integers(0, len(pool), args.memory_requests)]
            samples = [(0, server.rss_mb())]
            errors = 0
            for start in range(0, len(drawn), 1000):
                r = asyncio.run(load(server.url, drawn[start : start + 1000], 8))
                errors += r["errors"]
                samples.append((start + 1000, server.rss_mb()))
                print(f"memory after {start + 1000} requests: {samples[-1][1]:.0f} MB", flush=True)
            out["memory"] = {"backend": fastest["backend"], "samples": samples, "errors": errors}
        finally:
            server.stop()
    (OUT / "bench_serve.json").write_text(json.dumps(out, indent=2))
    print_table(out)


def print_table(out: dict) -> None:
    print(f"\n{out['machine']}; {out['date']}; `{out['command']}`\n")
    if "quality" in out:
        q = out["quality"]
        print(f"Test split ({q['n_test']} ads), same head: macro-F1 torch {q['torch']['macro_f1']:.4f}, "
              f"ONNX int8 {q['onnx-int8']['macro_f1']:.4f} (difference "
              f"{q['onnx-int8']['macro_f1'] - q['torch']['macro_f1']:+.4f}); accuracy {q['torch']['accuracy']:.4f} vs "
              f"{q['onnx-int8']['accuracy']:.4f}.\n")  # fmt: skip
    base = {r["concurrency"]: r["texts_per_s"] for r in out["load"] if r["backend"] == "torch" and not r["batching"]}
    print(
        "| backend | batching | concurrency | texts/s | vs torch, no batching | mean batch | p50 ms | p95 ms | p99 ms "
        "| errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["load"]:
        ratio = f"{r['texts_per_s'] / base[r['concurrency']]:.2f}×" if r["concurrency"] in base else ""
        print(
            f"| {r['backend']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['texts_per_s']:.1f} | "
            f"{ratio} | {r['mean_batch']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['errors']} |"
        )
    if "memory" in out:
        m = out["memory"]
        s = m["samples"]
        after_warm = [mb for n, mb in s if n >= 1000]
        print(f"\nMemory ({m['backend']}, batching on, cache off, {s[-1][0]} requests at concurrency 8, "
              f"{m['errors']} errors): resident {s[0][1]:.0f} MB at start, {after_warm[0]:.0f} MB after 1,000, "
              f"{s[-1][1]:.0f} MB at the end (max {max(after_warm):.0f}, "
              f"min {min(after_warm):.0f} after 1,000).")  # fmt: skip


if __name__ == "__main__":
    if "--summary" in sys.argv:
        print_table(json.loads((OUT / "bench_serve.json").read_text()))
    else:
        main()
