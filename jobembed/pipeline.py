"""Stage functions over a run folder, and ``run``: the whole pipeline from one config.

Run folder layout (``runs/<name>/``)::

    config.yaml        the resolved pipeline config, read back by later commands on the same run
    manifest.json      per stage: resolved config, input hashes, package versions, git commit
    prepare/           splits (Parquet), labels.json, data_card.json
    embed/<encoder>/   {train,val,test}.npy + embeddings.json
    head/              bundle with the MLP head (``train-head``)
    report/            report.md, metrics.json, per_class/, figures/ (``compare-report``)
    bundle/            bundle of the best bundleable system (``compare-report``)

Each stage stamps ``stage.json`` with a key hashed from its config section and its inputs' keys;
``run`` skips a stage whose stamp matches, so a re-run after an interruption resumes at the first
unfinished stage, and the embedding cache makes even a re-run stage cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobembed import data, embed, evaluate
from jobembed.artifacts import file_sha256, hash_obj, mark_stage_done, stage_is_current, write_manifest
from jobembed.bundle import save_bundle
from jobembed.config import PipelineConfig, load_config, write_resolved
from jobembed.errors import ConfigError, DataError
from jobembed.head import MLPHead

STAGES = ("prepare", "embed", "train-head", "compare-report")


def save_run_config(config: PipelineConfig) -> None:
    """Write the resolved config to the run folder so later commands on this run start from it."""
    write_resolved(config, config.run_dir)


def config_for_run(run_dir: Path, config_path: Path | None, overrides: dict[str, Any]) -> PipelineConfig:
    """The config of an existing run (its config.yaml), or ``config_path``, with CLI overrides on top."""
    base = config_path or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
    overrides = {"name": run_dir.name, "runs_dir": str(run_dir.parent), **overrides}
    return load_config(base, overrides)


def _embed_key(config: PipelineConfig, prepare_key: str) -> str:
    e = config.embed
    return hash_obj(
        [prepare_key, e.model, e.text_prompt, e.label_prompt, e.max_seq_length, e.precision, config.report.text_column]
    )


def stage_keys(config: PipelineConfig) -> dict[str, str]:
    """Each stage's input key; a change upstream changes every key downstream."""
    p = config.prepare
    if p.input is None:
        raise ConfigError("prepare.input is not set", fix="set prepare.input in the YAML or pass INPUT to prepare")
    if not Path(p.input).is_file():
        raise DataError(f"input file {p.input} not found", fix="check the path, or set $JOBEMBED_DATA for the demo")
    inputs = [file_sha256(Path(p.input))]
    if p.labels is not None and Path(p.labels.path).is_file():
        inputs.append(file_sha256(Path(p.labels.path)))
    prepare_key = hash_obj([p.model_dump(mode="json", exclude={"input"}), inputs])
    embed_key = _embed_key(config, prepare_key)
    head_key = hash_obj([embed_key, config.head.model_dump(mode="json", exclude={"device"})])
    report_key = hash_obj([embed_key, head_key, config.report.model_dump(mode="json")])
    return {"prepare": prepare_key, "embed": embed_key, "train-head": head_key, "compare-report": report_key}


def run_prepare(config: PipelineConfig, *, progress: bool = True) -> data.PrepareResult:
    result = data.prepare(config=config.prepare, out_dir=config.run_dir / "prepare", progress=progress)
    save_run_config(config)
    return result


def run_embed(config: PipelineConfig, *, progress: bool = True) -> dict[str, Path]:
    """Encode every split of the run with ``embed.model``; vectors go to ``embed/<encoder>/``."""
    _require_prepared(config.run_dir)
    embedder, _ = embed.make_embedders(config.embed)
    out = config.run_dir / "embed" / embed.encoder_slug(config.embed.model, embedder.fingerprint)
    paths = embed.embed_splits(
        prepare_dir=config.run_dir / "prepare",
        out_dir=out,
        config=config.embed,
        text_column=config.report.text_column,
        progress=progress,
    )
    write_manifest(
        config.run_dir,
        stage="embed",
        config=config.embed.model_dump(mode="json"),
        inputs={"fingerprint": embedder.fingerprint},
    )
    save_run_config(config)
    return paths


def run_train_head(config: PipelineConfig, *, progress: bool = True) -> dict[str, Any]:
    """Fit the MLP head on the train split (early stopping on val), score test, save a bundle in ``head/``.

    Returns:
        ``{"bundle": path, "test": metrics, "best_epoch": int, "temperature": float}``
    """
    _require_prepared(config.run_dir)
    splits = data.load_splits(config.run_dir / "prepare")
    labels = data.load_labels(config.run_dir / "prepare")
    embedder, _ = embed.make_embedders(config.embed)
    col = config.report.text_column
    vectors = {
        name: embedder.encode(frame[col].tolist(), progress=progress, description=f"embed {name}")
        for name, frame in splits.items()
    }
    y = {name: frame["label"].to_numpy(dtype=str) for name, frame in splits.items()}
    has_val = len(splits["val"]) > 0
    head = MLPHead.from_config(config.head).fit(
        vectors["train"], y["train"], X_val=vectors["val"] if has_val else None, y_val=y["val"] if has_val else None
    )
    test = (
        evaluate.classification_metrics(y["test"], head.predict(vectors["test"]), min_support=config.report.min_support)
        if len(y["test"])
        else {}
    )
    bundle = save_bundle(
        config.run_dir / "head",
        model=head,
        system="mlp",
        encoder=config.embed.model,
        config=config,
        labels=labels,
        copy_encoder=config.bundle.copy_encoder,
        metrics={"test": test},
    )
    write_manifest(
        config.run_dir,
        stage="train-head",
        config=config.head.model_dump(mode="json"),
        inputs={"fingerprint": embedder.fingerprint},
    )
    save_run_config(config)
    return {
        "bundle": bundle,
        "test": test,
        "best_epoch": int(head.best_epoch_),
        "temperature": head.temperature_,
        "calibration": getattr(head, "calibration_", {}),
    }


def run_compare_report(config: PipelineConfig, *, progress: bool = True) -> dict[str, Any]:
    from jobembed.report import compare_report

    _require_prepared(config.run_dir)
    metrics = compare_report(run_dir=config.run_dir, config=config, progress=progress)
    save_run_config(config)
    return metrics


def _require_prepared(run_dir: Path) -> None:
    if not (run_dir / "prepare" / "train.parquet").is_file():
        raise DataError(
            f"{run_dir} has no prepared splits",
            fix=f"run `jobembed prepare INPUT --out {run_dir}` (or `jobembed run CONFIG`) first",
        )


def run_pipeline(
    config: PipelineConfig,
    *,
    force: bool = False,
    progress: bool = True,
    on_stage: Callable[[str, str], None] | None = None,
) -> dict[str, str]:
    """Run prepare → embed → train-head → compare-report, skipping stages that are up to date.

    Args:
        force: re-run every stage even when its stamp matches.
        on_stage: callback ``(stage, "run" | "skip")`` for the CLI to print progress.

    Returns:
        stage -> "ran" | "skipped".
    """
    keys = stage_keys(config)
    save_run_config(config)
    runners = {
        "prepare": run_prepare,
        "embed": run_embed,
        "train-head": run_train_head,
        "compare-report": run_compare_report,
    }
    outputs = {"prepare": "prepare", "embed": "embed", "train-head": "head", "compare-report": "report"}
    status: dict[str, str] = {}
    upstream_ran = False
    for stage in STAGES:
        stage_dir = config.run_dir / outputs[stage]
        if not force and not upstream_ran and stage_is_current(stage_dir, keys[stage]):
            status[stage] = "skipped"
            if on_stage:
                on_stage(stage, "skip")
            continue
        if on_stage:
            on_stage(stage, "run")
        runners[stage](config, progress=progress)
        mark_stage_done(stage_dir, keys[stage])
        status[stage] = "ran"
        upstream_ran = True
    return status
