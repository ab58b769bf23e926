"""Experiment tracking: every stage that runs is logged to MLflow, Weights & Biases or TensorBoard (``tracking:``).

One tracker run per pipeline run (the run folder), one child per stage that runs:

- MLflow: a parent run per run folder (found again by its ``jobembed.run_dir`` tag, so later commands on the same
  folder add to it), a nested run per stage; the trainer's own callback logs into the stage's run while it is active.
  The bundle is logged as an MLflow model (pyfunc from code, no pickle):
  ``mlflow.pyfunc.load_model("runs:/<id>/bundle")`` classifies.
- Weights & Biases: one run per stage, grouped by the run folder (``group``), ``job_type`` the stage.
- TensorBoard: one subfolder per stage under ``<log_dir>/<run name>/``; scalars and text.

Each stage's run carries its resolved config (as params), its key, code version, the run folder and the git commit
(tags), its summary figures (metrics), its outputs' paths, and what the stage declares worth keeping
(``Stage.track``: the report's per-system CV and test metrics and its page, the bundle). A stage that is current is
skipped and logs nothing: a re-run does not log a stage twice. Only rank 0 of a distributed launch logs.

The engine calls ``open_tracker(config)`` and ``Tracker.stage(...)``; it names no backend. Backends are optional
extras (``pip install jobembed[tracking]``); asking for one that is not installed is one clear error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobembed.artifacts import git_commit
from jobembed.config import register_section
from jobembed.errors import ConfigError
from jobembed.sections import TrackingBackend, TrackingConfig

register_section("tracking", TrackingConfig)
logger = logging.getLogger(__name__)

# MLflow's limit on one param value.
_MAX_PARAM = 6000


@dataclass
class Tracked:
    """What a stage declares worth logging beyond its summary (``Stage.track``).

    Attributes:
        metrics: name -> number.
        artifacts: name -> a file or folder to upload.
        model: a bundle folder, logged as a model where the backend has models (MLflow).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    model: Path | None = None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys; lists and other leaves kept as they are."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}{k}." if prefix or k else "")
        return out
    return {prefix.rstrip("."): value}


def numbers(value: Any) -> dict[str, float]:
    """The finite numeric leaves of a summary, flattened (booleans left out)."""
    return {
        k: float(v)
        for k, v in flatten(value).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class StageRun:
    """One stage's run on a backend; ``record`` logs what the stage produced."""

    def log_metrics(self, metrics: Mapping[str, float]) -> None:  # pragma: no cover - overridden
        pass

    def log_artifact(self, name: str, path: Path) -> None:  # pragma: no cover - overridden
        pass

    def log_model(self, bundle: Path) -> None:
        self.log_artifact("bundle", bundle)

    def record(self, *, summary: Mapping[str, Any], folder: Path, tracked: Tracked | None) -> None:
        """Log what the stage produced; a failure here (the stage's outputs are already in place) is a warning, so the
        stage stays done and the command goes on."""
        try:
            self._record(summary=summary, folder=folder, tracked=tracked)
        except Exception as e:  # the tracker's own errors: network, quotas, a store's constraints
            logger.warning(
                "tracking: could not log the stage's outputs (%s: %s); the stage itself is done", type(e).__name__, e
            )

    def _record(self, *, summary: Mapping[str, Any], folder: Path, tracked: Tracked | None) -> None:
        metrics = numbers(summary) | (tracked.metrics if tracked else {})
        if metrics:
            self.log_metrics(metrics)
        outputs = folder / ".tracked-outputs.json"
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p != outputs)
        outputs.write_text(json.dumps({"folder": str(folder), "files": files}, indent=1))
        self.log_artifact("outputs", outputs)
        for name, path in (tracked.artifacts if tracked else {}).items():
            if path.exists():
                self.log_artifact(name, path)
        if tracked and tracked.model is not None and tracked.model.is_dir():
            self.log_model(tracked.model)


class Tracker:
    """No tracking (``backend: none``): every call does nothing."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, Path(run_dir)

    def tags(self, stage: str, *, key: str, version: int) -> dict[str, str]:
        return {
            "jobembed.run_dir": str(self.run_dir.resolve()),
            "jobembed.run": self.run_dir.name,
            "jobembed.stage": stage,
            "jobembed.stage_key": key,
            "jobembed.stage_version": str(version),
            "jobembed.git_commit": git_commit() or "unknown",
        }

    @contextlib.contextmanager
    def stage(self, name: str, *, key: str, version: int, settings: Mapping[str, Any]) -> Iterator[StageRun]:
        """A run for one stage, active while the stage runs (a trainer's callback logs into it)."""
        yield StageRun()

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        """One unit of the stage that runs (a CV fold's or a seed's fine-tune): its trainer's curves go under it."""
        yield

    def report_to(self) -> str:
        """The trainer's ``report_to`` for the stage that runs now."""
        return "none"


# ------------------------------------------------------------------------------------------------ MLflow


class _MlflowRun(StageRun):
    def __init__(self, mlflow: Any) -> None:
        self.mlflow = mlflow

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in metrics.items()})

    def log_artifact(self, name: str, path: Path) -> None:
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=name)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=name)

    def log_model(self, bundle: Path) -> None:
        """The bundle as an MLflow model: pyfunc from code (jobembed/mlflow_model.py), the bundle as its artifact."""
        from jobembed import __version__

        self.mlflow.pyfunc.log_model(
            name="bundle",
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"bundle": str(bundle)},
            pip_requirements=[f"jobembed=={__version__}"],
        )


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits and ``_ - . / space``; a system key has ``@``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class MlflowTracker(Tracker):
    """A parent run per run folder, a nested run per stage (see the module docstring)."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        super().__init__(config, run_dir)
        self.mlflow = _need("mlflow", "mlflow")
        uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent.resolve()}/mlflow.db"
        self.mlflow.set_tracking_uri(uri)
        self.uri = uri
        self._parent: str | None = None

    def _parent_run(self) -> str:
        if self._parent is None:
            if self.mlflow.get_experiment_by_name(self.config.experiment) is None:
                self.mlflow.create_experiment(self.config.experiment, artifact_location=_artifact_root(self.uri))
            experiment = self.mlflow.set_experiment(self.config.experiment)
            folder = str(self.run_dir.resolve()).replace("'", "\\'")  # a quote in the path would end the string
            mine = f"tags.`jobembed.run_dir` = '{folder}' and tags.`jobembed.kind` = 'pipeline'"
            found = self.mlflow.search_runs(
                [experiment.experiment_id], filter_string=mine, output_format="list", max_results=1
            )
            if found:
                self._parent = found[0].info.run_id
            else:
                tags = {"jobembed.run_dir": str(self.run_dir.resolve()), "jobembed.kind": "pipeline"}
                with self.mlflow.start_run(run_name=self.run_dir.name, tags=tags) as run:
                    self._parent = run.info.run_id
        return self._parent

    @contextlib.contextmanager
    def stage(self, name: str, *, key: str, version: int, settings: Mapping[str, Any]) -> Iterator[StageRun]:
        parent = self._parent_run()
        with (
            self.mlflow.start_run(run_id=parent),
            self.mlflow.start_run(run_name=name, nested=True, tags=self.tags(name, key=key, version=version)),
        ):
            params = {_mlflow_key(k): _param(v) for k, v in flatten(settings).items()}
            if params:
                self.mlflow.log_params(params)
            yield _MlflowRun(self.mlflow)

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        with self.mlflow.start_run(run_name=name, nested=True, tags={"jobembed.unit": name}):
            yield

    def report_to(self) -> str:
        return "mlflow"


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store. MLflow's default for a database store is
    ``./mlruns`` in the working directory, which would scatter models wherever a command happens to run; a server
    (``http``) or a file store chooses its own place (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM]


# ------------------------------------------------------------------------------------------------ W&B


class _WandbRun(StageRun):
    def __init__(self, wandb: Any, run: Any) -> None:
        self.wandb, self.run = wandb, run

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def log_artifact(self, name: str, path: Path) -> None:
        artifact = self.wandb.Artifact(f"{self.run.group}-{name}".replace("/", "-"), type=name)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)


class WandbTracker(Tracker):
    """One run per stage, grouped by the run folder (offline with ``WANDB_MODE=offline``)."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        super().__init__(config, run_dir)
        self.wandb = _need("wandb", "wandb")

    @contextlib.contextmanager
    def stage(self, name: str, *, key: str, version: int, settings: Mapping[str, Any]) -> Iterator[StageRun]:
        tags = self.tags(name, key=key, version=version)
        folder = Path(self.config.log_dir or self.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        run = self.wandb.init(
            project=self.config.experiment,
            group=self.run_dir.name,
            name=name,
            job_type=name,
            dir=str(folder),
            config={"settings": dict(settings), "tags": tags},
            tags=[f"stage_key:{key[:48]}", f"git:{tags['jobembed.git_commit'][:12]}"],
            reinit="finish_previous",
        )
        try:
            yield _WandbRun(self.wandb, run)
        finally:
            run.finish()

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        # A W&B process has one active run and a trainer logs into it from step 0: folds or seeds would overwrite one
        # another's curves, so inside a unit the trainer reports nothing (the stage's run keeps its summary).
        self._in_unit = True
        try:
            yield
        finally:
            self._in_unit = False

    def report_to(self) -> str:
        return "none" if getattr(self, "_in_unit", False) else "wandb"


# ------------------------------------------------------------------------------------------------ TensorBoard


class _TensorBoardRun(StageRun):
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, 0)

    def log_artifact(self, name: str, path: Path) -> None:
        # TensorBoard has no files: the path, so a reader can find the file
        self.writer.add_text(f"artifacts/{name}", str(path.resolve()), 0)


class TensorBoardTracker(Tracker):
    """One event folder per stage: ``<log_dir or RUN/tensorboard>/<stage>``."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        super().__init__(config, run_dir)
        _need("tensorboard", "tensorboard")
        self.root = Path(config.log_dir) if config.log_dir else self.run_dir / "tensorboard"
        self._current: Path | None = None

    @contextlib.contextmanager
    def stage(self, name: str, *, key: str, version: int, settings: Mapping[str, Any]) -> Iterator[StageRun]:
        from torch.utils.tensorboard import SummaryWriter

        self._current = self.root / name
        writer = SummaryWriter(log_dir=str(self._current))
        for k, v in self.tags(name, key=key, version=version).items():
            writer.add_text(f"tags/{k}", v, 0)
        writer.add_text("config", "```\n" + json.dumps(dict(settings), indent=1, default=str) + "\n```", 0)
        previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self._current / "trainer")  # the trainer's callback
        try:
            yield _TensorBoardRun(writer)
        finally:
            writer.close()
            if previous is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = previous

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if self._current is not None:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self._current / "trainer" / name)
        try:
            yield
        finally:
            if previous is not None:
                os.environ["TENSORBOARD_LOGGING_DIR"] = previous

    def report_to(self) -> str:
        return "tensorboard"


# ------------------------------------------------------------------------------------------------ choice

_BACKENDS = {
    TrackingBackend.none: Tracker,
    TrackingBackend.mlflow: MlflowTracker,
    TrackingBackend.wandb: WandbTracker,
    TrackingBackend.tensorboard: TensorBoardTracker,
}
_ACTIVE: list[Tracker] = []


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"tracking.backend asks for {extra}, but {module} is not installed",
            fix=f"pip install 'jobembed[{extra}]' (or all three: 'jobembed[tracking]'), or set tracking.backend: none",
        ) from None


class LazyTracker(Tracker):
    """Opens the backend on the first stage that runs: a command whose stages are all current logs nothing."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        super().__init__(config, run_dir)
        self._real: Tracker | None = None

    def _get(self) -> Tracker:
        if self._real is None:
            self._real = _BACKENDS[TrackingBackend(self.config.backend)](self.config, self.run_dir)
        return self._real

    @contextlib.contextmanager
    def stage(self, name: str, *, key: str, version: int, settings: Mapping[str, Any]) -> Iterator[StageRun]:
        _ACTIVE.append(self)
        try:
            with self._get().stage(name, key=key, version=version, settings=settings) as run:
                yield run
        finally:
            _ACTIVE.pop()

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[None]:
        with self._get().unit(name):
            yield

    def report_to(self) -> str:
        return self._get().report_to()


def open_tracker(config: Any, *, main: bool = True) -> Tracker:
    """The run's tracker (``config.tracking``); a no-op one off rank 0, with ``backend: none``, and for a config
    without a tracking section (the engine runs any graph of stages)."""
    section: TrackingConfig = getattr(config, "tracking", None) or TrackingConfig()
    if not main or TrackingBackend(section.backend) is TrackingBackend.none:
        return Tracker(section, config.run_dir)
    if TrackingBackend(section.backend) is TrackingBackend.mlflow:
        _need("mlflow", "mlflow")  # fail before any stage runs, not after the first one
    elif TrackingBackend(section.backend) is TrackingBackend.wandb:
        _need("wandb", "wandb")
    else:
        _need("tensorboard", "tensorboard")
    return LazyTracker(section, config.run_dir)


@contextlib.contextmanager
def unit(name: str) -> Iterator[None]:
    """A unit of the stage that runs now (``finetune-cv``'s folds, ``finetune-seeds``' seeds): each trainer's curves
    under a run (MLflow: a nested run) or folder (TensorBoard) of its own."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[-1].unit(name):
        yield


def report_to(config: Any = None) -> str:
    """What a trainer running inside the current stage reports to: the active tracker's backend, or ``none``."""
    if _ACTIVE:
        return _ACTIVE[-1].report_to()
    return "none"
