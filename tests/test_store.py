"""The cache store under concurrent writers and crashes (real processes, real SQLite files)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobembed.store import Store, StoreError

DIM = 8


def _key(i: int) -> bytes:
    return i.to_bytes(20, "big")


def _vec(i: int) -> np.ndarray:
    return np.arange(DIM, dtype=np.float32) + i


def _writer(folder: str, start: int, stop: int, batch: int) -> None:
    table = Store(Path(folder)).vectors("shared")
    for lo in range(start, stop, batch):
        ids = range(lo, min(stop, lo + batch))
        table.put([_key(i) for i in ids], np.stack([_vec(i) for i in ids]))


def test_put_get_missing_keep_order_and_first_value(tmp_path):
    table = Store(tmp_path).vectors("ns")
    assert len(table) == 0 and table.missing([_key(1), _key(1)]) == [_key(1)]
    table.put([_key(1), _key(2)], np.stack([_vec(1), _vec(2)]))
    table.put([_key(2)], np.stack([_vec(99)]))  # present keys keep their vector
    np.testing.assert_array_equal(table.get([_key(2), _key(1), _key(2)]), np.stack([_vec(2), _vec(1), _vec(2)]))
    assert table.missing([_key(3), _key(1)]) == [_key(3)]
    with pytest.raises(KeyError):
        table.get([_key(3)])
    with pytest.raises(StoreError, match="8-dim"):
        table.put([_key(4)], np.zeros((1, 3), dtype=np.float32))


def test_records_round_trip_json(tmp_path):
    store = Store(tmp_path)
    assert store.get_record("llm", "k") is None
    store.put_record("llm", "k", {"answer": "tak", "n": [1, 2]})
    assert Store(tmp_path).get_record("llm", "k") == {"answer": "tak", "n": [1, 2]}


def test_four_writer_processes_on_one_store(tmp_path):
    """Like DDP ranks or server workers: overlapping key ranges, many small transactions, no lost vector."""
    ctx = multiprocessing.get_context("spawn")
    ranges = [(0, 600), (400, 1000), (900, 1500), (0, 1500)]
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), a, b, 37)) for a, b in ranges]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = Store(tmp_path)
    table = store.vectors("shared")
    assert len(table) == 1500 and store.integrity_check() == "ok"
    np.testing.assert_array_equal(table.get([_key(i) for i in range(1500)]), np.stack([_vec(i) for i in range(1500)]))


def test_killed_writer_leaves_a_consistent_store(tmp_path):
    """SIGKILL in the middle of writing: reopen, nothing corrupt, every transaction all-or-nothing."""
    root, folder = str(Path(__file__).resolve().parents[1]), str(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        f"from tests.test_store import _writer\n_writer({folder!r}, 0, 10**7, 50)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    store = Store(tmp_path)
    while time.time() < deadline and (not (tmp_path / "store.sqlite3").exists() or len(store.vectors("shared")) < 500):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reopened = Store(tmp_path)
    table = reopened.vectors("shared")
    n = len(table)
    assert reopened.integrity_check() == "ok"
    assert n >= 500 and n % 50 == 0  # whole batches only
    np.testing.assert_array_equal(table.get([_key(i) for i in range(n)]), np.stack([_vec(i) for i in range(n)]))
    table.put([_key(n)], np.stack([_vec(n)]))  # and it is writable again
    assert len(table) == n + 1


def test_explicit_read_only_ignores_puts(tmp_path):
    Store(tmp_path).vectors("ns").put([_key(1)], np.stack([_vec(1)]))
    ro = Store(tmp_path, readonly=True)
    table = ro.vectors("ns")
    table.put([_key(2)], np.stack([_vec(2)]))
    ro.put_record("k", "v", 1)
    assert ro.readonly and len(table) == 1 and table.missing([_key(2)]) == [_key(2)]
    np.testing.assert_array_equal(table.get([_key(1)]), np.stack([_vec(1)]))


def test_read_only_without_a_store_file_is_an_empty_store(tmp_path):
    table = Store(tmp_path / "nothing", readonly=True).vectors("ns")
    assert len(table) == 0 and table.missing([_key(1)]) == [_key(1)]


def test_foreign_file_is_a_clear_error(tmp_path):
    (tmp_path / "store.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="delete"):
        Store(tmp_path).vectors("ns").missing([_key(1)])
