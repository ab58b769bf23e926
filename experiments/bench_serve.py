"""Load on a real ``jobembed serve`` over loopback: texts/s and latency, micro-batching on/off, torch vs ONNX int8.

    .venv/bin/python experiments/bench_serve.py                     # CPU: the table of docs/benchmarks.md#serve
    bash experiments/gpu_serve.sh       # on a lent GPU: random-init XLM-R base, torch, batching on vs off

1. Bundles late fusion of TF-IDF + LR and the MLP head, the CV winner of experiments/quality.py, on that run's data
   and settings (pl-jobads ISCO sub-major, rules-cleaned text, builtin multilingual-e5-small at 256 tokens): the
   bundle a portal would serve.
2. Quality of the int8 export: macro-F1 and accuracy of the bundle on the test split with the torch encoder and with
   the ONNX int8 encoder, same head (the int8 vectors are not cached: the cache is off).
3. For each backend x batching on/off, one server process (``--no-cache``: every text is encoded), then a closed-loop
   httpx asyncio client at concurrency 1, 8 and 32 sending one real ad per request, each request a different
   ad (never a repeat, so nothing could be answered from a cache); every setting gets the same ads at each level.
   The baseline is the plain way (the original project's): torch, one encode call per request (batching off).
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
from jobembed.stages import run_stages


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


def random_init_bundle(shape: str, tokenizer: Path, texts: Path, device: str) -> tuple[Path, list[str]]:
    """For a machine without weights (the lent GPU): a random-init encoder of ``shape`` (bench_finetune's builder)
    with the e5 tokenizer, an MLP head fit on random labels, bundled; fp16 on CUDA as a GPU run would embed.
    Throughput is all it measures: the answers mean nothing."""
    import tempfile

    from bench_finetune import build_model

    from jobembed.bundle import EncoderInfo, save_bundle
    from jobembed.embed import Embedder
    from jobembed.head import MLPHead

    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    build_model(shape, tokenizer, 256, "cpu").save(str(root / "encoder"))
    pool = pd.read_parquet(texts)["anchor"].drop_duplicates().sample(frac=1, random_state=3).tolist()
    precision = "fp16" if device.startswith("cuda") else "fp32"
    config = load_config(
        None,
        {
            "text_column": "text",
            "embed": {"model": str(root / "encoder"), "max_seq_length": 256, "device": device, "precision": precision},
        },
    )
    embedder = Embedder(config.embed, prompt="query: ")
    X = embedder.encode(pool[:400])
    labels = [f"{i:02d}" for i in range(40)]
    y = np.random.default_rng(0).choice(labels, len(X))
    head = MLPHead(hidden_sizes=(256,), max_epochs=3, device=device).fit(X, y)
    info = EncoderInfo(
        model=str(root / "encoder"),
        fingerprint=embedder.fingerprint,
        precision=embedder.precision,
        text_prompt="query: ",
        max_seq_length=256,
    )
    frame = pd.DataFrame({"label": labels, "name": labels, "description": [""] * len(labels)})
    bundle = save_bundle(root / "bundle", model=head, system="mlp", encoder=info, config=config, labels=frame)
    return bundle, pool[400:]


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
    ap.add_argument("--repeats", type=int, default=2, help="server processes per setting (interleaved)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--random-init", metavar="SHAPE", help="no weights here (a lent GPU): xlmr-base, e5-small, tiny")
    ap.add_argument("--tokenizer", type=Path, default=Path(".bench/tokenizer"), help="with --random-init")
    ap.add_argument("--texts", type=Path, default=Path(".bench/triplets.parquet"), help="with --random-init")
    args = ap.parse_args()

    if args.random_init:
        bundle_dir, pool = random_init_bundle(args.random_init, args.tokenizer, args.texts, args.device)
        run_dir = None
    else:
        bundle_dir, run_dir = build_bundle(args.label)
        pool = pd.read_parquet(run_dir / "prepare" / "train.parquet")["text"].drop_duplicates()
        pool = pool.sample(frac=1, random_state=3).tolist()
    out: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "date": datetime.now(UTC).date().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "bundle": str(bundle_dir),
        "device": args.device,
    }
    if run_dir is not None and not args.skip_quality and args.device == "cpu":
        out["quality"] = quality(bundle_dir, run_dir)
    levels = [int(c) for c in args.concurrency.split(",")]
    # every setting gets the same ads at each level; no ad is sent twice within a setting
    slices, start = {}, 0
    for c in levels:
        n = max(args.requests, 4 * c)
        slices[c], start = pool[start : start + n], start + n
    out["load"] = []
    # off, on, off, on, ...: server-to-server spread on this machine is large, so each setting runs --repeats times,
    # interleaved, each in a fresh server process
    order = [(b, batching) for b in args.backends.split(",") for _ in range(args.repeats) for batching in (False, True)]
    for run, (backend, batching) in enumerate(order):
        flags = ["--backend", backend, "--no-cache", "--device", args.device]
        flags.append("--batching" if batching else "--no-batching")
        server = Server(bundle_dir, *flags)
        try:
            asyncio.run(load(server.url, pool[-16:], 2))  # warm the threads and connections; not counted
            for c in levels:
                texts = slices[c]
                texts0, calls0 = batch_totals(server.url)
                r = asyncio.run(load(server.url, texts, c))
                texts1, calls1 = batch_totals(server.url)
                mean_batch = (texts1 - texts0) / max(calls1 - calls0, 1)
                r.update(backend=backend, batching=batching, concurrency=c, mean_batch=mean_batch, run=run)
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
    name = "bench_serve.json" if args.device == "cpu" else f"bench_serve_{args.device.split(':')[0]}.json"
    (Path(os.environ.get("OUT", OUT)) / name).write_text(json.dumps(out, indent=2))
    print_table(out)


def print_table(out: dict) -> None:
    print(f"\n{out['machine']}; {out['date']}; `{out['command']}`\n")
    if "quality" in out:
        q = out["quality"]
        print(f"Test split ({q['n_test']} ads), same head: macro-F1 torch {q['torch']['macro_f1']:.4f}, "
              f"ONNX int8 {q['onnx-int8']['macro_f1']:.4f} (difference "
              f"{q['onnx-int8']['macro_f1'] - q['torch']['macro_f1']:+.4f}); accuracy {q['torch']['accuracy']:.4f} vs "
              f"{q['onnx-int8']['accuracy']:.4f}.\n")  # fmt: skip
    rows: dict[tuple, list[dict]] = {}
    for r in out["load"]:
        rows.setdefault((r["backend"], r["batching"], r["concurrency"]), []).append(r)
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
    base = {c: mean(rs, "texts_per_s") for (b, on, c), rs in rows.items() if b == "torch" and not on}
    print(
        "| backend | batching | concurrency | texts/s (mean of runs: each run) | vs torch, no batching | mean batch "
        "| p50 ms | p95 ms | p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (backend, on, c), rs in rows.items():
        each = ", ".join(f"{r['texts_per_s']:.1f}" for r in rs)
        ratio = f"{mean(rs, 'texts_per_s') / base[c]:.2f}×" if c in base else ""
        print(
            f"| {backend} | {'on' if on else 'off'} | {c} | {mean(rs, 'texts_per_s'):.1f} ({each}) | {ratio} | "
            f"{mean(rs, 'mean_batch'):.1f} | {mean(rs, 'p50_ms'):.0f} | {mean(rs, 'p95_ms'):.0f} | "
            f"{mean(rs, 'p99_ms'):.0f} | {sum(r['errors'] for r in rs)} |"
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
