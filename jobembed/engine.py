"""The engine: stages, their keys and stamps, and folders written whole. It names no stage; stages register here.

A ``Stage`` declares the config it reads (its own section, and any other fields), the stages whose outputs it
reads and which of their files (``consumes``), what else its result depends on (``identity``: input file hashes,
model fingerprints), and which of the files it writes later stages read (``products``). ``run_stages`` runs a
target stage and whatever it needs that is not current.

**Keys.** A stage's key hashes its name, code version, the config it reads (runtime-only fields left out), its
identity, and the content digest of every input file it consumes, read from the input stage's stamp. So a key
changes when, and only when, something the stage reads changed: a re-run upstream that reproduces identical files
leaves it current, and one that writes new ones (a forced fine-tune: new weights, same settings) makes it stale.

**Current** means: its stamp holds its key, and every file the stamp lists is still there with the size (and, for
products, the content) it had. A deleted or truncated output re-runs the stage that made it.

**Atomic folders.** A stage writes into ``.<folder>.tmp`` beside its folder; the engine writes the stamp there and
swaps the folder in whole. An interrupted stage (Ctrl-C, a kill, a full disk) leaves the old folder, stamp and all,
or none: never new files beside old ones. Subfolders a stage names in ``keep`` (checkpoints, units) live in the
folder itself, outside the swap, so a killed run resumes from them; a swap cut short by a kill is finished or undone
at the next start. A stage's folder is locked while it runs: a second process gets one line, not a race.

**Units.** A stage may split its work into units (e.g. cross-validation folds), each with its own key, stamp and
folder under ``units/``, built atomically: a killed stage resumes with the units it finished.

**Disabled stages** (``enabled`` false) do not run and are not read; their folders are left as they are, so turning
a stage off never deletes what it made.

Run folder: ``config.yaml`` (the resolved config), ``manifest.json`` (per stage: config, input digests, code
version, package versions, git commit) and one folder per stage, each with its ``stage.json``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobembed import distributed, tracking
from jobembed.artifacts import hash_obj, pause_for_test, read_json, write_json, write_manifest
from jobembed.config import load_config, section_for_key, write_resolved
from jobembed.errors import ConfigError, DataError, JobembedError
from jobembed.fingerprint import content_digest

STAMP = "stage.json"
STAMP_FORMAT = "jobembed-stamp/2"
UNITS = "units"


class KeepStamp(Exception):
    """Raised by an identity function that cannot look at its inputs now (e.g. the input file moved): the stage's
    stamp, if any, stands in, so a finished stage stays current; without one, or when the stage must run again,
    the message says why it cannot."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def _always(config: Any) -> bool:
    return True


def _never(config: Any) -> bool:
    return False


def _nothing(config: Any) -> None:
    return None


# A consumed input's file patterns, or a function that gives them. Patterns that resolve a model (an encoder's folder
# is named by its fingerprint) are functions: called when a key is hashed, after the run's models are pinned, so
# working out which stages a command needs resolves no model (no network, no builtin build) and an empty run folder
# gets the first stage's own message.
Patterns = tuple[str, ...] | Callable[[], tuple[str, ...]]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the command, the folder and the config section share it.
        run: ``(StageContext) -> summary``; writes the stage's outputs into ``ctx.out``.
        inputs: stages whose outputs it may read (they run first).
        section: the name of its own config section (usually ``name``), or None.
        reads: other config it reads: a section (``"<section>"``) or one field (``"<section>.<field>"``); in the key.
        ignores: fields of a ``reads`` section it does not read (``"<section>.<field>"``); out of the key.
        identity: what else its result depends on (input file hashes, model fingerprints), JSON-able; may raise
            ``KeepStamp``.
        consumes: ``config -> {input stage: file patterns}``: which inputs' files it reads (fnmatch patterns over
            paths relative to the input's folder; ``"*"`` all), or a function that gives them (``Patterns``). An
            input left out is not read. Default: every product of every input.
        products: patterns of the files later stages read; their content digests go into those stages' keys.
        enabled: ``config -> bool``; a disabled stage neither runs nor is read, and its folder is left alone.
        off_reason: ``config -> str`` for the progress line of a disabled stage.
        keep: subfolders that live outside the swap and survive re-runs (checkpoints), besides ``units/``.
        all_ranks: run on every process of a distributed launch (the rest run on rank 0 alone).
        on_cpu: ``config -> bool``: whether its processes talk over the CPU backend (gloo) or the GPU one.
        names_models: ``config -> bool``: it resolves a model reference, so every model reference of the config is
            pinned (``register_pin``) before its key.
        summarise: its summary goes into manifest.json.
        version: the stage's code version, in its key. Bump it (and say why next to it) when a change to the code
            changes what it writes for the same config and inputs; not for speed-ups, messages or refactors.
        folder: the folder it writes, default ``name``.
        formerly: the names it had before renames, oldest first. Its key hashes the oldest (and its inputs' keys
            theirs), so a run folder made before a rename stays current: nothing a user paid for is made again.
            Old names are accepted wherever a stage is named (``run_stages(target=...)``, commands).
        help: one line for ``describe`` (what runs and why).
        command: the CLI command that runs it (a Typer function; ``jobembed.cli`` adds it to the app), or None.
        command_name: that command's name, default ``name``; ``"<group> <name>"`` puts it in a group of commands.
        track: ``(config, folder) -> tracking.Tracked``: what experiment tracking logs of it beyond its summary
            (metrics, artifacts, a model folder); None logs the summary and the outputs' paths.
    """

    name: str
    run: Callable[[StageContext], dict[str, Any] | None]
    inputs: tuple[str, ...] = ()
    section: str | None = None
    reads: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    identity: Callable[[Any], Any] = _nothing
    consumes: Callable[[Any], Mapping[str, Patterns]] | None = None
    products: tuple[str, ...] = ("*",)
    enabled: Callable[[Any], bool] = _always
    off_reason: Callable[[Any], str] = lambda config: "disabled"
    keep: tuple[str, ...] = ()
    all_ranks: bool = False
    on_cpu: Callable[[Any], bool] = _always
    names_models: Callable[[Any], bool] = _never
    summarise: bool = False
    version: int = 1
    folder: str = ""
    formerly: tuple[str, ...] = ()
    help: str = ""
    command: Callable[..., Any] | None = None
    command_name: str = ""
    track: Callable[[Any, Path], Any] | None = None

    @property
    def cli_name(self) -> str:
        return self.command_name or self.name

    @property
    def dir_name(self) -> str:
        return self.folder or self.name

    @property
    def key_name(self) -> str:
        """The name its key hashes: the first it ever had."""
        return self.formerly[0] if self.formerly else self.name


STAGES: dict[str, Stage] = {}
FORMER_NAMES: dict[str, str] = {}  # an old stage name -> its name now
_PINS: list[Callable[[Any], Any]] = []


def register(stage: Stage) -> Stage:
    """Add a stage to the graph; its inputs must already be registered (registration order is run order)."""
    missing = [i for i in stage.inputs if i not in STAGES]
    assert not missing and stage.name not in STAGES, (stage.name, missing)
    assert not {stage.name, *stage.formerly} & (set(STAGES) | set(FORMER_NAMES)), stage.name
    STAGES[stage.name] = stage
    FORMER_NAMES.update(dict.fromkeys(stage.formerly, stage.name))
    return stage


def stage_name(name: str) -> str:
    """A stage's name now, given it or a name it had before a rename."""
    return FORMER_NAMES.get(name, name)


def register_pin(pin: Callable[[Any], Any]) -> None:
    """Add a ``config -> config`` that replaces model references by canonical ones (Hub ids pinned to a commit).

    Every registered pin runs once, before the key of the first stage that names a model: so no key is ever hashed
    over a reference that a later stage rewrites, and a run whose first stages need no model needs no Hub.
    """
    _PINS.append(pin)


def consumed(name: str, config: Any) -> dict[str, Patterns]:
    """The inputs ``name`` reads under ``config`` and which of their files (or a function that gives them); disabled
    inputs are left out."""
    stage = STAGES[name]
    wanted = stage.consumes(config) if stage.consumes else {i: STAGES[i].products for i in stage.inputs}
    return {
        i: p if callable(p) else tuple(p) for i, p in wanted.items() if i in stage.inputs and STAGES[i].enabled(config)
    }


def needed(name: str, config: Any) -> list[str]:
    """``name`` and every stage it reads from, transitively, under ``config``, in run order."""
    found: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(consumed(current, config))
    return [s for s in STAGES if s in found]


# ------------------------------------------------------------------------------------------- keys


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return section_for_key(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def stage_settings(stage: Stage, config: Any) -> dict[str, Any]:
    """The config a stage reads, as it goes into its key: its section and ``reads``, less runtime fields and
    ``ignores``."""
    out: dict[str, Any] = {}
    for path in ((stage.section,) if stage.section else ()) + stage.reads:
        top, _, leaf = path.partition(".")
        value = getattr(config, top)
        out[path] = _jsonable(getattr(value, leaf) if leaf else value)
    for path in stage.ignores:
        top, _, leaf = path.partition(".")
        if isinstance(out.get(top), dict):
            out[top].pop(leaf, None)
    return out


class Plan:
    """Stage keys for one config, computed when each stage comes up (its inputs' stamps are then final)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.identities: dict[str, Any] = {}
        self.blocked: dict[str, KeepStamp] = {}
        self.input_digests: dict[str, dict[str, str]] = {}

    def key(self, name: str, *, version: int | None = None) -> str:
        """Stage ``name``'s key; ``version`` in place of the stage's own (for a stage whose units are keyed by the
        content version of what a unit holds, which may lag the version of how the stage assembles them)."""
        stage = STAGES[name]
        folder = self.config.run_dir / stage.dir_name
        try:
            identity = stage.identity(self.config)
        except KeepStamp as reason:
            stamp = read_stamp(folder)
            if stamp is None or "identity" not in stamp:
                raise DataError(str(reason), fix=reason.fix) from None
            identity, self.blocked[name] = stamp["identity"], reason
        self.identities[name] = identity
        digests = {i: self.digest(i, p() if callable(p) else p) for i, p in consumed(name, self.config).items()}
        self.input_digests[name] = digests
        payload = {
            "stage": stage.key_name,
            "version": stage.version if version is None else version,
            "config": stage_settings(stage, self.config),
            "identity": identity,
            "inputs": {STAGES[i].key_name: d for i, d in digests.items()},
        }
        return hash_obj(payload)

    def digest(self, name: str, patterns: tuple[str, ...]) -> str:
        """The content digest of the files of stage ``name`` that match ``patterns``, from its stamp."""
        stamp = read_stamp(self.config.run_dir / STAGES[name].dir_name)
        products = (stamp or {}).get("products")
        if stamp is None or stamp.get("format") != STAMP_FORMAT or not isinstance(products, dict):
            return "pending"  # not made yet (a dry look at the plan): whatever it makes will change the key
        chosen = sorted((rel, sha) for rel, sha in products.items() if any(fnmatch.fnmatch(rel, p) for p in patterns))
        return hash_obj(chosen)


# ------------------------------------------------------------------------------------------- stamps


def read_stamp(folder: Path) -> dict[str, Any] | None:
    """The ``stage.json`` a finished stage (or unit) left in its folder, or None (absent or unreadable)."""
    try:
        data = read_json(Path(folder) / STAMP)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _listed(folder: Path, keep: tuple[str, ...]) -> list[str]:
    """Every file of a stage's folder the stamp answers for: not the stamp, hidden files (caches a consumer may write,
    such as a model's fingerprint sidecar) or the kept subfolders."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        parts = rel.split("/")
        if rel == STAMP or parts[0] in keep or any(p.startswith(".") for p in parts) or not path.is_file():
            continue
        out.append(rel)
    return out


def _write_stamp(
    folder: Path, *, key: str, products: tuple[str, ...], keep: tuple[str, ...], **extra: Any
) -> dict[str, Any]:
    files, digests = {}, {}
    for rel in _listed(folder, keep):
        st = (folder / rel).stat()
        files[rel] = [st.st_size, st.st_mtime_ns]
        if not rel.endswith(".md") and any(fnmatch.fnmatch(rel, p) for p in products):
            digests[rel] = content_digest(folder / rel)
    stamp = {
        "format": STAMP_FORMAT,
        "key": key,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
        "files": files,
        "products": digests,
    }
    write_json(folder / STAMP, stamp)
    return stamp


def damage(folder: Path, stamp: dict[str, Any]) -> str | None:
    """What is wrong with a stamped folder's files (one phrase), or None when every listed file is as it was.

    Sizes for every file; for products whose modification time moved, their content (a copy with new mtimes is
    fine, an edit is not).
    """
    products = stamp.get("products") or {}
    for rel, (size, mtime) in (stamp.get("files") or {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{folder.name}/{rel} is missing"
        st = path.stat()
        if st.st_size != size or (
            rel in products and st.st_mtime_ns != mtime and content_digest(path) != products[rel]
        ):
            return f"{folder.name}/{rel} changed since it was made"
    return None


def why_stale(folder: Path, key: str, *, forced: bool) -> str | None:
    """Why a stage (or unit) folder is not current for ``key`` (a phrase for the progress line), or None."""
    stamp = read_stamp(folder)
    if forced:
        return "forced"
    if stamp is None:
        made = folder.is_dir() and any(p.name not in (UNITS,) for p in folder.iterdir())
        return "no stamp: an earlier run was cut short" if made else "not made yet"
    if stamp.get("format") != STAMP_FORMAT:
        return "made by an older jobembed"
    if stamp.get("key") != key:
        return "its settings or inputs changed"
    return damage(folder, stamp)


# ------------------------------------------------------------------------------------------- atomic folders


def _tmp(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.tmp")


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def recover(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Finish or undo a swap a kill cut short, and drop an unfinished build (its kept subfolders live in the folder).

    Killed between the two renames of a swap: the old folder comes back. Killed after them: the kept subfolders move
    from the old folder into the new one.
    """
    old, tmp = _old(folder), _tmp(folder)
    if old.exists():
        if not folder.exists():
            os.replace(old, folder)
        else:
            for name in (*keep, UNITS):
                if (old / name).exists() and not (folder / name).exists():
                    os.replace(old / name, folder / name)
            shutil.rmtree(old)
    if tmp.exists():
        shutil.rmtree(tmp)


def _commit(tmp: Path, folder: Path, keep: tuple[str, ...]) -> None:
    """Swap ``tmp`` in as ``folder``, moving the kept subfolders of the old one across."""
    old = _old(folder)
    if folder.exists():
        os.replace(folder, old)
    pause_for_test("engine:swap")
    os.replace(tmp, folder)
    if old.exists():
        for name in (*keep, UNITS):
            if (old / name).exists() and not (folder / name).exists():
                os.replace(old / name, folder / name)
        shutil.rmtree(old)


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (a ``.<name>.lock`` file beside it) while a stage writes it.

    Raises:
        JobembedError: another process holds it (its pid named).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        yield
        return
    path = folder.with_name(f".{folder.name}.lock")
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise JobembedError(
                f"another jobembed process (pid {holder}) is running {what} on {folder.parent}",
                fix="wait for it to finish (or stop it), then run the command again",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Unit:
    """One resumable piece of a stage's work (a CV fold, say): its own key, stamp and folder, built atomically.

    ``current`` tells whether a finished unit with this key is on disk; ``build()`` yields a temporary folder to write
    and swaps it in with its stamp when the block succeeds. Under a distributed launch only rank 0 writes.
    """

    def __init__(self, folder: Path, key: str, products: tuple[str, ...] = ("*",)) -> None:
        self.folder, self.key, self.products = folder, key, products

    @property
    def current(self) -> bool:
        return why_stale(self.folder, self.key, forced=False) is None

    @contextlib.contextmanager
    def build(self) -> Iterator[Path]:
        tmp = _tmp(self.folder)
        main = distributed.is_main()
        if main:
            recover(self.folder)
            tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if main:
            _write_stamp(tmp, key=self.key, products=self.products, keep=())
            _commit(tmp, self.folder, ())


def unit_of(stage: str, folder: Path, name: str, identity: Any, products: tuple[str, ...] = ("*",)) -> Unit:
    """Unit ``name`` of ``stage`` (whose folder is ``folder``); also for a dry look at which units are current."""
    key = hash_obj({"stage": STAGES[stage].key_name, "unit": name, "identity": identity})
    return Unit(folder / UNITS / name, key, products)


@dataclass
class StageContext:
    """What a stage's ``run`` gets.

    Attributes:
        config: the resolved pipeline config (models pinned).
        out: the folder to write the outputs into (swapped in as ``folder`` when ``run`` returns).
        folder: where the outputs will live: paths written into outputs must point here, not at ``out``.
        key: the stage's key (names resumable work, e.g. ``checkpoints/<key>``).
        progress: show progress bars.
    """

    name: str
    config: Any
    out: Path
    folder: Path
    key: str
    progress: bool
    _after: list[Callable[[], None]] = field(default_factory=list)

    def keep_dir(self, name: str) -> Path:
        """A subfolder of the stage's folder that survives re-runs (must be one of the stage's ``keep``)."""
        assert name in STAGES[self.name].keep, (self.name, name)
        path = self.folder / name
        if distributed.is_main():
            path.mkdir(parents=True, exist_ok=True)
        return path

    def unit(self, name: str, identity: Any, products: tuple[str, ...] = ("*",)) -> Unit:
        """A unit of this stage's work under ``units/<name>``, keyed by ``identity`` (what the unit reads)."""
        return unit_of(self.name, self.folder, name, identity, products)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the outputs are swapped in (e.g. drop checkpoints that are no longer needed)."""
        self._after.append(fn)


# ------------------------------------------------------------------------------------------- running


def check_run_dir(run_dir: Path) -> None:
    """Fail early, with one line, when the run folder cannot be a folder we write into."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "run folder" if parent == run_dir else f"parent {parent} of the run folder"
                raise ConfigError(
                    f"the {what} is a file, not a folder", fix="pass another run folder (or runs_dir / name)"
                )
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a probe of its own: the ranks of a distributed launch check the same new folder at the same moment
        fd, probe = tempfile.mkstemp(prefix=".jobembed-write-test-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write into the run folder {run_dir} ({e.strerror or e})",
            fix="pass a folder you can write to",
        ) from None


def pin_models(config: Any) -> Any:
    """``config`` with every registered pin applied (canonical model references, Hub ids pinned to a commit)."""
    for pin in _PINS:
        config = pin(config)
    return config


OnStage = Callable[[str, str, str], None]


def run_stages(
    config: Any,
    *,
    target: str | None = None,
    force: bool = False,
    progress: bool = True,
    on_stage: OnStage | None = None,
) -> dict[str, str]:
    """Run ``target`` (default: every stage) and whatever it needs that is not current.

    The run's config.yaml is written after each stage that succeeds and once all are current, so a bad flag never
    sticks to the run and a good one always does.

    Args:
        force: re-run ``target`` (every stage when ``target`` is None) even when current.
        on_stage: callback ``(stage, "run" | "skip" | "off", reason)`` for the CLI to print progress.

    Returns:
        stage -> "ran" | "skipped" | "off", in run order.
    """
    # the run folder and any parents of it this command makes: a failure before anything is written removes them
    created = [p for p in [config.run_dir, *config.run_dir.parents] if not p.exists()]
    check_run_dir(config.run_dir)
    try:
        return _run(
            config,
            names=needed(stage_name(target), config) if target else list(STAGES),
            target=target,
            force=force,
            progress=progress,
            on_stage=on_stage if distributed.is_main() else None,
        )
    except BaseException:
        if created:
            _remove_if_unused(config.run_dir, created[1:])
        raise


def _remove_if_unused(run_dir: Path, parents: list[Path]) -> None:
    """Remove a run folder this command made, when it holds nothing but stage locks, and the ``parents`` it made
    (innermost first) that are left empty: a command that failed before writing anything leaves no folder behind."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if not all(p.is_file() and p.name.startswith(".") and p.name.endswith(".lock") for p in entries):
        return
    for p in entries:
        p.unlink(missing_ok=True)
    run_dir.rmdir()
    for parent in parents:
        try:
            parent.rmdir()  # only when empty: another run may have been made beside ours meanwhile
        except OSError:
            return


def _run(
    config: Any,
    *,
    names: list[str],
    target: str | None,
    force: bool,
    progress: bool,
    on_stage: OnStage | None,
) -> dict[str, str]:
    status: dict[str, str] = {}
    main, many = distributed.is_main(), distributed.world_size() > 1
    pinned = False
    tracker = tracking.open_tracker(config, main=main)
    for name in names:
        stage = STAGES[name]
        if not stage.enabled(config):
            status[name] = "off"
            if on_stage:
                on_stage(name, "off", stage.off_reason(config))
            continue
        everywhere = many and stage.all_ranks
        if many and not stage.all_ranks and not main:
            continue  # rank 0 runs it; this rank waits for it at the next stage that runs everywhere
        if not pinned and stage.names_models(config):
            config, pinned = pin_models(config), True
        folder = config.run_dir / stage.dir_name
        keep = stage.keep
        plan = Plan(config)
        key, reason = "", None
        if main:
            recover(folder, keep)
            key = plan.key(name)
            reason = why_stale(folder, key, forced=force and (target is None or name == stage_name(target)))
        if everywhere:
            # The other ranks wait here for rank 0 to finish the stages before; only rank 0 knows what ran.
            distributed.wait_for_everyone(cpu=stage.on_cpu(config))
            key, reason, config = distributed.from_main((key, reason, config), cpu=stage.on_cpu(config))
        if reason is None:
            status[name] = "skipped"
            if on_stage:
                on_stage(name, "skip", "")
            continue
        if name in plan.blocked:  # it must run again, but cannot look at its inputs
            blocked = plan.blocked[name]
            raise DataError(f"{name} must run again ({reason}), but {blocked}", fix=blocked.fix)
        if on_stage:
            on_stage(name, "run", reason)
        settings = stage_settings(stage, config)
        with tracker.stage(name, key=key, version=stage.version, settings=settings) as tracked:
            summary = _execute(
                stage, config, folder=folder, key=key, progress=progress, identity=plan.identities.get(name)
            )
            status[name] = "ran"
            if not main:
                continue
            write_manifest(
                config.run_dir,
                stage=name,
                config=settings,
                inputs={"identity": plan.identities.get(name), **plan.input_digests.get(name, {})},
                version=stage.version,
                summary=summary if stage.summarise else None,
                replaces=stage.formerly,
            )
            write_resolved(config, config.run_dir)
            tracked.record(summary=summary, folder=folder, tracked=stage.track(config, folder) if stage.track else None)
    if main and config.run_dir.is_dir():
        # Every stage asked for is current under this config: it is the run's now, though no stage read what
        # changed (a field that only a stage after the target reads).
        write_resolved(config, config.run_dir)
    return status


def _execute(stage: Stage, config: Any, *, folder: Path, key: str, progress: bool, identity: Any) -> dict[str, Any]:
    """Run one stage into a fresh temporary folder, stamp it and swap it in (rank 0); other ranks only compute."""
    main = distributed.is_main()
    tmp = _tmp(folder)
    with folder_lock(folder, stage.name) if main else contextlib.nullcontext():
        if main:
            recover(folder, stage.keep)
            tmp.mkdir(parents=True)
        ctx = StageContext(stage.name, config, tmp, folder, key, progress)
        try:
            summary = stage.run(ctx) or {}
            if main:
                pause_for_test(f"{stage.name}:before-commit")
                _write_stamp(tmp, key=key, products=stage.products, keep=stage.keep, identity=identity,
                             version=stage.version)  # fmt: skip
                _commit(tmp, folder, stage.keep)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if stage.all_ranks and distributed.world_size() > 1:
        distributed.wait_for_everyone(cpu=stage.on_cpu(config))
    for fn in ctx._after if main else ():
        fn()
    return summary


def describe(config: Any) -> list[dict[str, str]]:
    """Every stage of the run and whether it is current, off, or why it would run (``jobembed status``).

    Nothing is run or written. A stage after one that would run shows ``waits`` (its key depends on what that stage
    will write).
    """
    rows: list[dict[str, str]] = []
    pending: set[str] = set()
    pinned = False
    for name, stage in STAGES.items():
        if not stage.enabled(config):
            rows.append({"stage": name, "state": "off", "why": stage.off_reason(config), "help": stage.help})
            continue
        if pending & set(consumed(name, config)):
            rows.append({"stage": name, "state": "waits", "why": "an input will run first", "help": stage.help})
            pending.add(name)
            continue
        if not pinned and stage.names_models(config):
            config, pinned = pin_models(config), True
        folder = config.run_dir / stage.dir_name
        try:
            reason = why_stale(folder, Plan(config).key(name), forced=False)
        except JobembedError as e:
            reason = str(e).split(". Fix:")[0]
        if reason is None:
            rows.append({"stage": name, "state": "current", "why": "", "help": stage.help})
        else:
            rows.append({"stage": name, "state": "runs", "why": reason, "help": stage.help})
            pending.add(name)
    return rows


def config_for_run(
    run_dir: Path, config_path: Path | None, overrides: dict[str, Any], *, flags: dict[str, str] | None = None
) -> Any:
    """The config of a run: its own config.yaml, with ``config_path`` layered on top (its fields win), and CLI
    overrides on top of both.

    A run folder whose stages ran but whose config.yaml is gone cannot be continued from defaults (they would name
    other models and files): that is one line naming the missing file.
    """
    run_dir = Path(run_dir)
    own = run_dir / "config.yaml"
    overrides = {"name": run_dir.name, "runs_dir": str(run_dir.parent), **overrides}
    made = any((run_dir / s.dir_name / STAMP).is_file() for s in STAGES.values())
    if not own.is_file() and made and config_path is None:
        raise ConfigError(
            f"{own} is missing: the run's settings are gone, and defaults would name other models and files",
            fix="restore that file, or pass the run's settings with -c FILE",
        )
    bases = [p for p in (own if own.is_file() else None, config_path) if p is not None]
    return load_config(bases, overrides, flags=flags)
