"""Benchmark: the vector cache's store. SQLite in WAL mode (jobembed.store, the choice) vs LMDB vs the old
safetensors shards (one file per encode call, every shard loaded at start).

    .venv/bin/python experiments/bench_cache.py [--n 20000] [--dim 384]

Workloads, each backend in fresh folders, same random float32 vectors and 20-byte keys:
- bulk:    put --n vectors in chunks of 2,048 (the embed stage's checkpoints)
- reopen:  open the filled store in a new process and look up 400 random keys (a warm re-run)
- single:  5,000 puts of one vector each (a server classifying one text per request), then files on disk
- restart: open after those 5,000 single puts and look up one key (a server's start-up), and the memory that
           opening takes (the shards load every vector)
- writers: 4 processes writing 5,000 vectors each in chunks of 64 at the same time; then every vector checked
LMDB needs `pip install lmdb` (not a jobembed dependency); without it that column is skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------------------- backends


class Shards:
    """The old VectorCache (jobembed before the store): one safetensors file per put, all loaded at start."""

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.shards: list[np.ndarray] = []
        for path in sorted(folder.glob("shard-*.safetensors")):
            data = load_file(path)
            self._add(data["keys"], data["vectors"])

    def _add(self, keys, vectors):
        shard = len(self.shards)
        self.shards.append(vectors)
        for row, key in enumerate(keys):
            self.index[key.tobytes()] = (shard, row)

    def put(self, keys, vectors):
        from safetensors.numpy import save_file

        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 20)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"keys": key_arr, "vectors": np.ascontiguousarray(vectors)}, str(tmp))
        os.replace(tmp, self.folder / name)
        self._add(key_arr, vectors)

    def get(self, keys):
        return np.stack([self.shards[s][r] for s, r in (self.index[k] for k in keys)])


class Sqlite:
    def __init__(self, folder: Path) -> None:
        from jobembed.store import Store

        self.table = Store(folder).vectors("bench")

    def put(self, keys, vectors):
        self.table.put(keys, vectors)

    def get(self, keys):
        return self.table.get(keys)


class Lmdb:
    def __init__(self, folder: Path) -> None:
        import lmdb

        folder.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(folder), map_size=8 << 30, max_readers=64)

    def put(self, keys, vectors):
        with self.env.begin(write=True) as txn:
            for k, v in zip(keys, vectors, strict=True):
                txn.put(k, v.tobytes(), overwrite=False)

    def get(self, keys):
        with self.env.begin() as txn:
            return np.stack([np.frombuffer(txn.get(k), dtype="<f4") for k in keys])


BACKENDS = {"sqlite": Sqlite, "lmdb": Lmdb, "shards": Shards}
SINGLE = 5_000  # single-vector puts: a server's requests


def data(n: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [bytes(k) for k in rng.integers(0, 256, (n, 20), dtype=np.uint8)]
    return keys, rng.normal(size=(n, dim)).astype(np.float32)


def _writer(backend: str, folder: str, seed: int, n: int, dim: int) -> None:
    store = BACKENDS[backend](Path(folder))
    keys, vectors = data(n, dim, seed)
    for start in range(0, n, 64):
        store.put(keys[start : start + 64], vectors[start : start + 64])


def child(args) -> dict:
    """One timed step in a fresh process (so opening really starts from disk)."""
    store_cls, folder = BACKENDS[args.backend], Path(args.folder)
    keys, vectors = data(args.n, args.dim)
    # Imports are not what is measured: load each backend's module before the clock starts.
    import safetensors.numpy  # noqa: F401

    import jobembed.store  # noqa: F401

    if args.backend == "lmdb":
        import lmdb  # noqa: F401
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    if args.step == "reopen":
        store = store_cls(folder)
        pick = np.random.default_rng(1).choice(args.n, 400, replace=False)
        got = store.get([keys[i] for i in pick])
        assert np.array_equal(got, vectors[pick])
    elif args.step == "restart":
        store = store_cls(folder)
        single_keys, single_vectors = data(SINGLE, args.dim, seed=2)
        assert np.array_equal(store.get(single_keys[:1]), single_vectors[:1])
    return {"seconds": time.perf_counter() - t0, "rss_growth_mb": _rss_mb() - rss_before}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_backend(backend: str, n: int, dim: int) -> dict:
    out: dict = {}
    keys, vectors = data(n, dim)
    with tempfile.TemporaryDirectory() as tmp:
        bulk, single, shared = Path(tmp) / "bulk", Path(tmp) / "single", Path(tmp) / "shared"
        store = BACKENDS[backend](bulk)
        t0 = time.perf_counter()
        for start in range(0, n, 2048):
            store.put(keys[start : start + 2048], vectors[start : start + 2048])
        out["bulk_put_s"] = time.perf_counter() - t0
        out["reopen_lookup_400_s"], out["reopen_rss_mb"] = _child(backend, bulk, "reopen", n, dim)
        store = BACKENDS[backend](single)
        single_keys, single_vectors = data(SINGLE, dim, seed=2)
        t0 = time.perf_counter()
        for i in range(SINGLE):
            store.put(single_keys[i : i + 1], single_vectors[i : i + 1])
        out["single_put_ms_each"] = (time.perf_counter() - t0) * 1000 / SINGLE
        out["single_files"] = sum(1 for p in single.rglob("*") if p.is_file())
        out["restart_lookup_1_s"], _ = _child(backend, single, "restart", n, dim)
        ctx = multiprocessing.get_context("spawn")
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_writer, args=(backend, str(shared), 10 + s, 5000, dim)) for s in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        out["four_writers_s"] = time.perf_counter() - t0
        ok = all(p.exitcode == 0 for p in procs)
        if ok:
            reader = BACKENDS[backend](shared)
            for s in range(4):
                k, v = data(5000, dim, 10 + s)
                try:
                    ok &= bool(np.array_equal(reader.get(k), v))
                except KeyError:
                    ok = False
        out["four_writers_all_vectors_ok"] = ok
        out["bulk_disk_mb"] = sum(p.stat().st_size for p in bulk.rglob("*") if p.is_file()) / 1e6
    return out


def _child(backend: str, folder: Path, step: str, n: int, dim: int) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--child", step, "--backend", backend, "--folder", str(folder)]
    cmd += ["--n", str(n), "--dim", str(dim)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["seconds"], out["rss_growth_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.step = args.child
        print(json.dumps(child(args)))
        return
    results = {}
    for backend in BACKENDS:
        if backend == "lmdb":
            try:
                import lmdb  # noqa: F401
            except ImportError:
                print("lmdb not installed: skipped (pip install lmdb)")
                continue
        results[backend] = run_backend(backend, args.n, args.dim)
        print(backend, json.dumps(results[backend]), flush=True)
    rows = [
        ("bulk put, chunks of 2,048 (s)", "bulk_put_s", "{:.2f}"),
        ("new process: open + look up 400 keys (s)", "reopen_lookup_400_s", "{:.3f}"),
        ("... memory that took (MB)", "reopen_rss_mb", "{:.0f}"),
        ("5,000 single-vector puts (ms per put)", "single_put_ms_each", "{:.2f}"),
        ("files after the 5,000 single puts", "single_files", "{}"),
        ("new process after them: open + 1 lookup (s)", "restart_lookup_1_s", "{:.3f}"),
        ("4 writer processes, 4 x 5,000 in chunks of 64 (s)", "four_writers_s", "{:.2f}"),
        ("... every vector present and equal", "four_writers_all_vectors_ok", "{}"),
        ("disk for the bulk store (MB)", "bulk_disk_mb", "{:.0f}"),
    ]
    print(f"\n{args.n} vectors of dim {args.dim}")
    print("| workload | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for title, key, fmt in rows:
        print(f"| {title} | " + " | ".join(fmt.format(r[key]) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
