"""Small helpers every stage shares: atomic writes, file hashes, run manifests, stage stamps.

A stage writes its outputs into a temporary name and renames them into place, so an interrupted run
never leaves a half-written file that a later run would trust. A ``stage.json`` stamp records the
hash of everything the stage consumed; ``jobembed run`` skips a stage whose stamp still matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from jobembed.errors import BundleError

logger = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_obj(obj: Any) -> str:
    """A stable hash of a JSON-able object (configs, lists of file hashes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(
    names: Iterable[str] = (
        "jobembed",
        "torch",
        "sentence-transformers",
        "transformers",
        "scikit-learn",
        "numpy",
        "pandas",
    ),
) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(
    run_dir: Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    summary: dict[str, Any] | None = None,
    version: int | None = None,
    replaces: tuple[str, ...] = (),
) -> None:
    """Add or refresh one stage's entry in ``run_dir/manifest.json``.

    A manifest that is not valid JSON (edited by hand, truncated by a full disk) is moved aside to
    ``manifest.json.corrupt-<time>`` and a new one is started: the stage's work is never lost over it.

    Args:
        stage: stage name ("prepare", "embed", ...).
        config: the stage's resolved config (JSON-able).
        inputs: input name -> content hash.
        summary: what the stage reports about its run (JSON-able), e.g. the triplets stage's calls, tokens and cost.
        version: the stage's code version (``Stage.version``) that wrote it.
        replaces: names the stage had before a rename: their entries are dropped (this one describes the stage now).
    """
    path = run_dir / "manifest.json"
    manifest: Any = None
    if path.is_file():
        try:
            manifest = read_json(path)
        except (ValueError, UnicodeDecodeError):
            manifest = None
        if not (isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict)):
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            os.replace(path, path.with_name(f"manifest.json.corrupt-{stamp}"))
            logger.warning("%s was not a jobembed manifest; moved aside and started anew", path)
            manifest = None
    manifest = manifest or {"stages": {}}
    manifest.update(packages=package_versions(), git_commit=git_commit(), platform=platform.platform())
    for old in replaces:
        manifest["stages"].pop(old, None)
    manifest["stages"][stage] = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
    }
    if version is not None:
        manifest["stages"][stage]["version"] = version
    if summary:
        manifest["stages"][stage]["summary"] = summary
    write_json(path, manifest)


PAUSE_ENV = "JOBEMBED_TEST_PAUSE_AT"


def pause_for_test(point: str) -> None:
    """A test-only hook: when ``$JOBEMBED_TEST_PAUSE_AT`` names ``point``, print a marker line and block until a
    signal arrives, so interrupt tests send their SIGINT/SIGKILL at a known step, not at a random moment."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    print(f"jobembed-test-paused: {point}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in whole when the block succeeds.

    Files from an earlier version of ``target`` never survive beside the new ones (a report with fewer
    systems leaves no stale per-class tables), and an interrupted build leaves the old folder intact.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def check_format(meta_path: Path, meta: dict[str, Any], expected: str, *, what: str = "format") -> None:
    """Refuse a saved artifact whose JSON sidecar carries another format tag (one ``BundleError`` line)."""
    if meta.get("format") != expected:
        raise BundleError(
            f"{meta_path}: unsupported {what}",
            expected=expected,
            found=str(meta.get("format")),
            fix="re-create the bundle with this jobembed version",
        )
