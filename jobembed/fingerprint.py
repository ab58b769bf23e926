"""A model folder's identity is its content: the SHA-256 of every file, hashed once and remembered.

``folder_fingerprint(folder)`` hashes every file of a model folder in full (weights included: a
fine-tuned encoder whose embeddings and pooler are untouched still differs in its middle layers) and
keeps the per-file digests in a sidecar, ``.jobembed-fingerprint.json``. Later calls re-verify each file
by size and modification time and re-hash only files whose size or mtime changed, so a 470 MB folder
costs one full read in its lifetime, not one per process.

The sidecar lives inside the folder when jobembed may write there; for read-only folders and folders
inside installed packages it lives in ``<cache>/fingerprints/``. What does not change what a model computes is
left out: hidden files (the sidecar itself, editors' and git's), Markdown model cards, and the bookkeeping keys
that libraries write into their ``*config*.json`` files (library versions, ``local_files_only``): two builds of
``builtin:multilingual-e5-small``, one with ``HF_HUB_OFFLINE`` set and one without, differ only there, and a
bundle made on one machine must load on the other.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from jobembed.artifacts import file_sha256, write_json

SIDECAR = ".jobembed-fingerprint.json"
SIDECAR_FORMAT = "jobembed-fingerprint/2"
# Keys of *config*.json files that record how or where a folder was written, not what the model computes.
VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "local_files_only", "is_local", "__version__", "_name_or_path", "_commit_hash"}
)


def model_files(folder: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file that makes up the model, sorted by path."""
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if rel.endswith(".md") or any(part.startswith(".") for part in Path(rel).parts) or not f.is_file():
            continue
        st = f.stat()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


def folder_fingerprint(folder: Path) -> str:
    """16 hex characters identifying the content of a model folder (see the module docstring).

    Two folders with the same files (a copy, a bundle's ``encoder/``) share a fingerprint wherever they
    lie; changing any byte of any counted file gives a new one.
    """
    folder = Path(folder).expanduser().resolve()
    return _fingerprint(str(folder), tuple(model_files(folder)))


@functools.lru_cache(maxsize=256)
def _fingerprint(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    # Memoised on (path, sizes, mtimes): within one process a folder is re-verified only when a file changed.
    path = Path(folder)
    sidecar = sidecar_path(path)
    known = _read_sidecar(sidecar)
    entries: dict[str, dict[str, Any]] = {}
    for rel, size, mtime in files:
        seen = known.get(rel)
        if isinstance(seen, dict) and seen.get("size") == size and seen.get("mtime_ns") == mtime and seen.get("sha256"):
            digest = seen["sha256"]
        else:
            digest = content_digest(path / rel)
        entries[rel] = {"size": size, "mtime_ns": mtime, "sha256": digest}
    if entries != known:
        # A read-only place: the digests are simply recomputed by the next process.
        with contextlib.suppress(OSError):
            write_json(sidecar, {"format": SIDECAR_FORMAT, "files": entries})
    h = hashlib.sha256()
    for rel in sorted(entries):
        h.update(f"{rel}\0{entries[rel]['sha256']}\0".encode())
    return h.hexdigest()[:16]


def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes; for a ``*config*.json`` file, of its canonical JSON without volatile keys."""
    if path.suffix == ".json" and "config" in path.name and path.stat().st_size < (1 << 20):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return file_sha256(path)
        if isinstance(data, dict):
            kept = {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}
            return hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return file_sha256(path)


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def sidecar_path(folder: Path) -> Path:
    """Where the digests of ``folder`` are kept: inside it when writable and not an installed package."""
    in_package = any(part in {"site-packages", "dist-packages"} for part in folder.parts)
    if not in_package and os.access(folder, os.W_OK):
        return folder / SIDECAR
    from jobembed.config import default_cache_dir

    name = hashlib.sha1(str(folder).encode()).hexdigest()[:20]
    return default_cache_dir() / "fingerprints" / f"{name}.json"
