"""One on-disk store for everything jobembed caches: embedding vectors now, JSON records (LLM calls,
extractions, model fingerprints) for the stages that need them.

SQLite in WAL mode, from the standard library (measured against LMDB and the old safetensors shards in
``experiments/bench_cache.py``; see docs/benchmarks.md):

- Lookups go through the primary-key index and load nothing up front, so opening a store with a million
  vectors costs the same as opening an empty one. Every text a stage or ``classify`` encodes is kept here
  (the store grows with them); ``serve`` does not write here: it keeps a bounded in-memory cache
  (``serve.cache_size``, ``embed.MemoryCache``).
- Several processes (DDP ranks, server workers, two CLI runs) read and write at once: readers never
  block, writers queue on a busy timeout, and each ``put`` is one transaction, so a killed process
  leaves the store as it was before its last unfinished ``put``.
- Where the folder cannot be written (a read-only server image) the store opens read-only: hits are
  served, misses are computed and not kept.

Layout of ``<cache>/store.sqlite3``::

    namespaces(id, name UNIQUE, dim, info JSON)      one per encoder setting (see embed.cache_namespace)
    vectors(ns, key BLOB, vec BLOB)                  key = SHA-1 of the text, vec = float32 little-endian
    records(kind, key, value JSON, created)          any JSON-able value, by (kind, key)
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobembed.errors import JobembedError

logger = logging.getLogger(__name__)

STORE_FILE = "store.sqlite3"
STORE_FORMAT = "jobembed-store/1"
# SQLite's default limit on ? parameters is 32766 (>= 3.32); 900 keeps every IN (...) far below it.
_CHUNK = 900
# A writer waits this long for another process's transaction before giving up (DDP ranks write at once).
_BUSY_MS = 120_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces(
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, dim INTEGER NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors(
    ns INTEGER NOT NULL, key BLOB NOT NULL, vec BLOB NOT NULL, PRIMARY KEY(ns, key));
CREATE TABLE IF NOT EXISTS records(
    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(kind, key)) WITHOUT ROWID;
"""


class StoreError(JobembedError):
    """The cache store is damaged or cannot be opened."""


def _writable(folder: Path) -> bool:
    """True when ``folder`` exists (or can be created) and files can be written into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


class Store:
    """A handle on ``folder/store.sqlite3``; cheap to create, opened on first use, one connection per process.

    Args:
        folder: The cache folder (``default_cache_dir()`` or ``embed.cache_dir``).
        readonly: ``None`` opens read-write where the folder is writable, else read-only; ``True`` forces
            read-only (puts are ignored), ``False`` raises when the folder cannot be written.
    """

    def __init__(self, folder: Path, *, readonly: bool | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STORE_FILE
        self._want_readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.RLock()
        self.readonly = bool(readonly)
        self._warned = False

    # ------------------------------------------------------------------------------------ connection

    def _connect(self) -> sqlite3.Connection:
        """The process's connection (a forked child opens its own: SQLite handles must not cross a fork)."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        readonly = self._want_readonly
        if readonly is None:
            readonly = not _writable(self.folder) or (self.path.exists() and not os.access(self.path, os.W_OK))
        elif readonly is False and not _writable(self.folder):
            raise StoreError(
                f"cache folder {self.folder} is not writable",
                fix="set JOBEMBED_CACHE or embed.cache_dir to a writable folder",
            )
        try:
            conn = self._open_readonly() if readonly else self._open_readwrite()
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"cannot open the cache store {self.path} ({e})",
                fix=f"delete {self.path} (only cached results are lost) or point JOBEMBED_CACHE elsewhere",
            ) from None
        self._conn, self._pid, self.readonly = conn, os.getpid(), readonly
        return conn

    def _open_readwrite(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        # WAL: readers never wait for the writer; synchronous=NORMAL is durable against a killed process
        # (a power cut can lose the last transactions, never corrupt the file).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)  # idempotent; executescript commits, so it runs outside the transaction
        with _transaction(conn):
            found = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if found is None:
                conn.execute("INSERT INTO meta(key, value) VALUES ('format', ?)", (STORE_FORMAT,))
            elif found[0] != STORE_FORMAT:
                raise StoreError(
                    f"the cache store {self.path} has another format",
                    expected=STORE_FORMAT,
                    found=found[0],
                    fix=f"delete {self.path} or use another JOBEMBED_CACHE",
                )
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.exists():
            # Nothing cached and nowhere to write: an empty in-memory store with the same schema.
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.executescript(_SCHEMA)
            return conn
        for query in ("mode=ro", "mode=ro&immutable=1"):
            # A WAL database needs its -shm file; in a read-only folder without one, immutable=1 still reads.
            conn = sqlite3.connect(f"file:{self.path}?{query}", uri=True, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("SELECT count(*) FROM namespaces").fetchone()
                return conn
            except sqlite3.OperationalError:
                conn.close()
        raise sqlite3.DatabaseError("read-only open failed")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _warn_readonly(self) -> None:
        if not self._warned:
            logger.warning("cache store %s is read-only: new results are not kept", self.path)
            self._warned = True

    # ------------------------------------------------------------------------------------ vectors

    def vectors(self, name: str, *, dim: int | None = None, info: dict[str, Any] | None = None) -> VectorTable:
        """The vector table of one namespace (created on the first ``put``)."""
        return VectorTable(self, name, info=info or {})

    def _namespace(self, name: str, dim: int | None, info: dict[str, Any]) -> tuple[int, int] | None:
        """``(id, dim)`` of a namespace; created when ``dim`` is given and the store is writable."""
        conn = self._connect()
        row = conn.execute("SELECT id, dim FROM namespaces WHERE name=?", (name,)).fetchone()
        if row is not None or dim is None or self.readonly:
            return row
        with _transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO namespaces(name, dim, info) VALUES (?, ?, ?)",
                (name, int(dim), json.dumps(info, sort_keys=True, default=str)),
            )
            return conn.execute("SELECT id, dim FROM namespaces WHERE name=?", (name,)).fetchone()

    # ------------------------------------------------------------------------------------ records

    def get_record(self, kind: str, key: str) -> Any | None:
        """The JSON value stored under ``(kind, key)``, or ``None``."""
        return self.get_records(kind, [key]).get(key)

    def put_record(self, kind: str, key: str, value: Any) -> None:
        """Store a JSON-able value (replacing an older one); ignored when the store is read-only."""
        self.put_records(kind, {key: value})

    def get_records(self, kind: str, keys: Sequence[str]) -> dict[str, Any]:
        """``{key: value}`` for the keys of ``kind`` that are stored (missing keys are left out)."""
        found: dict[str, Any] = {}
        with self._lock:
            conn = self._connect()
            for start in range(0, len(keys), _CHUNK):
                chunk = list(keys[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT key, value FROM records WHERE kind=? AND key IN ({marks})", (kind, *chunk))
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_records(self, kind: str, items: dict[str, Any]) -> None:
        """Store many JSON-able values in one transaction (a crash keeps all of them or none)."""
        if not items:
            return
        with self._lock:
            conn = self._connect()
            if self.readonly:
                self._warn_readonly()
                return
            now = time.time()
            rows = [(kind, k, json.dumps(v, ensure_ascii=False, default=str), now) for k, v in items.items()]
            with _transaction(conn):
                conn.executemany("INSERT OR REPLACE INTO records(kind, key, value, created) VALUES (?, ?, ?, ?)", rows)

    def integrity_check(self) -> str:
        """SQLite's own ``PRAGMA integrity_check``: ``"ok"`` for an intact file."""
        with self._lock:
            return str(self._connect().execute("PRAGMA integrity_check").fetchone()[0])


class VectorTable:
    """The vectors of one namespace: ``missing``/``get``/``put`` by 20-byte text keys.

    Vectors are float32 rows of one dimension per namespace, stored as raw little-endian bytes (never
    pickled).
    """

    def __init__(self, store: Store, name: str, *, info: dict[str, Any]) -> None:
        self.store, self.name, self.info = store, name, info
        self._ns: tuple[int, int] | None = None

    def _lookup(self, dim: int | None = None) -> tuple[int, int] | None:
        if self._ns is None:
            self._ns = self.store._namespace(self.name, dim, self.info)
        return self._ns

    @property
    def dim(self) -> int | None:
        ns = self._lookup()
        return None if ns is None else int(ns[1])

    def __len__(self) -> int:
        with self.store._lock:
            ns = self._lookup()
            if ns is None:
                return 0
            return int(self.store._connect().execute("SELECT count(*) FROM vectors WHERE ns=?", (ns[0],)).fetchone()[0])

    def __contains__(self, key: bytes) -> bool:
        return not self.missing([key])

    def _rows(self, keys: Sequence[bytes], columns: str) -> Iterable[tuple]:
        ns = self._lookup()
        if ns is None:
            return
        conn = self.store._connect()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from conn.execute(f"SELECT {columns} FROM vectors WHERE ns=? AND key IN ({marks})", (ns[0], *chunk))

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys (in input order, without repeats) that have no vector yet."""
        unique = list(dict.fromkeys(keys))
        with self.store._lock:
            found = {row[0] for row in self._rows(unique, "key")}
        return [k for k in unique if k not in found]

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        """``(len(keys), dim)`` float32 vectors in key order; every key must be present.

        Raises:
            KeyError: a key has no vector (check with ``missing`` first).
        """
        unique = list(dict.fromkeys(keys))
        with self.store._lock:
            rows = dict(self._rows(unique, "key, vec"))
            dim = self.dim
        if len(rows) < len(unique):
            absent = next(k for k in unique if k not in rows)
            raise KeyError(f"no cached vector for key {absent.hex()} in namespace {self.name}")
        if not keys:
            return np.zeros((0, dim or 0), dtype=np.float32)
        out = np.empty((len(keys), dim), dtype=np.float32)
        for i, key in enumerate(keys):
            out[i] = np.frombuffer(rows[key], dtype="<f4")
        return out

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Write ``(n, dim)`` vectors in one transaction; keys already present keep their vector."""
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"{len(keys)} keys for vectors of shape {vectors.shape}")
        with self.store._lock:
            conn = self.store._connect()
            if self.store.readonly:
                self.store._warn_readonly()
                return
            ns = self._lookup(vectors.shape[1])
            assert ns is not None
            if ns[1] != vectors.shape[1]:
                raise StoreError(
                    f"namespace {self.name} holds {ns[1]}-dim vectors, got {vectors.shape[1]}",
                    fix="this is a cache-key collision; delete the store file and re-run",
                )
            with _transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO vectors(ns, key, vec) VALUES (?, ?, ?)",
                    ((ns[0], bytes(k), v.tobytes()) for k, v in zip(keys, vectors, strict=True)),
                )


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error): takes the write lock up front, so two writers
    queue on the busy timeout instead of failing with "database is locked" at commit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


_STORES: dict[tuple[str, bool | None], Store] = {}
_STORES_LOCK = threading.Lock()


def open_store(folder: Path, *, readonly: bool | None = None) -> Store:
    """The process-wide ``Store`` for a cache folder (one connection per folder and process)."""
    key = (str(Path(folder).expanduser().resolve()), readonly)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = Store(Path(key[0]), readonly=readonly)
        return _STORES[key]
