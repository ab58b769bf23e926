"""finetune-cv: the fine-tuning recipe run inside every CV fold, so the report can put the fine-tuned systems in its
CV table (``finetune-cv/``). Off unless ``report.finetune_cv``.

For fold k of the report's folds (the same repost-grouped folds over train + val, ``evaluate.cv_folds``), on that
fold's training rows only:

1. the inner slice: the repost-grouped, stratified slice of the fold's training rows that the MLP head holds out
   for early stopping and calibration inside the fold (``head.validation_fraction``, ``head.seed``), so the frozen
   systems and the fine-tune use one slice;
2. triplets mined on the rest and judged (the run's judge and its caches: an LLM judge pays for a text once across
   folds), validation triplets mined on the inner slice;
3. the run's finetune section applied to them (checkpoint choice on the inner slice: CentroidEvaluator);
4. every dev ad and the category texts encoded with that fold's encoder.

No fold's encoder sees a label of its held-out rows or their reposts. Each fold is a unit of the stage (its own key,
stamp and folder under ``units/``), so a killed run resumes with the folds it finished; a fold's model and
checkpoints are dropped once its vectors are written, unless ``report.keep_fold_models``. Under ``torchrun`` every
rank fine-tunes; rank 0 alone mines, judges, encodes and writes.

Outputs: ``fold-<k>/`` (``dev.npy``: float32 (n_dev, dim) in train + val order; ``labels.npy``; ``taxonomy.npy``
when the run has a taxonomy; ``fold.json``) and
``folds.json``; each unit also keeps its fold's triplets (``triplets/``) and ``finetune/`` (finetune.json, log).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from jobembed import distributed, tracking, ui
from jobembed.artifacts import hash_obj, pause_for_test, read_json, write_json
from jobembed.config import default_cache_dir, register_check
from jobembed.engine import Stage, StageContext, Unit, register
from jobembed.errors import DataError, JobembedError
from jobembed.evaluate import FoldVectors, cv_folds, dev_pool
from jobembed.finetune import CLASSIFIER_FILE, CLASSIFIER_META, read_classifier
from jobembed.head import holdout_split
from jobembed.sections import FinetuneLoss
from jobembed.stages._common import frozen_identity, names_models, run_vectors, taxonomy_rows
from jobembed.stages.finetune import (
    centroid_data,
    encode_with,
    finetune_identity,
    finetune_on_cpu,
    keep_classifier,
    recipe_data,
    run_recipe,
    taxonomy_identity,
)
from jobembed.stages.triplets import (
    inputs_for,
    judge_probs_identity,
    judged_splits,
    label_positive_identity,
    prompts_identity,
    triplets_consume,
)
from jobembed.store import open_store
from jobembed.triplets.core import make_triplets

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig

FOLDS_FORMAT = "jobembed-finetune-cv/1"


class FoldsLeft(JobembedError):
    """The stage stopped at ``report.max_new_folds`` with folds left to do (the finished ones are kept)."""


def ids_sha1(frame: pd.DataFrame) -> str:
    return hash_obj(frame["id"].astype(str).tolist())


def inner_slice(config: PipelineConfig, dev: pd.DataFrame, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rest, inner slice) of a fold's training rows, as dev row indices: the slice the MLP holds out in the fold."""
    y = dev["label"].to_numpy(dtype=str)[train_idx]
    rest, inner = holdout_split(
        np.unique(y, return_inverse=True)[1],
        fraction=config.head.validation_fraction,
        seed=config.head.seed,
        groups=dev["group"].to_numpy()[train_idx],
    )
    return train_idx[rest], train_idx[inner]


def _identity(config: PipelineConfig) -> dict[str, Any]:
    """The frozen encoder that mines, the judge's prompts, and the base encoder with its training prompts."""
    return (
        frozen_identity(config)
        | prompts_identity()
        | {"finetune": finetune_identity(config)}
        | taxonomy_identity(config)
        | label_positive_identity(config)
        | judge_probs_identity(config)
    )


def _run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    if config.finetune.triplets is not None:
        raise DataError(
            f"report.finetune_cv mines triplets inside each fold, but finetune.triplets names a file "
            f"({config.finetune.triplets}) whose ads may sit in any fold",
            fix="unset finetune.triplets (the run mines its own), or turn report.finetune_cv off",
        )
    splits, labels = judged_splits(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    X_dev = np.concatenate([frozen.train, frozen.val])
    folds = cv_folds(dev, n_folds=config.report.cv_folds, seed=config.prepare.seed)
    summaries, built, limit = [], 0, config.report.max_new_folds
    for k, (train_idx, held_out) in enumerate(folds, 1):
        unit = ctx.unit(f"fold-{k}", identity=_unit_identity(ctx.key, dev, held_out))
        if unit.current:
            _note(f"finetune-cv: fold {k} of {len(folds)} up to date (kept)")
        elif limit is not None and built >= limit:
            raise FoldsLeft(
                f"finetune-cv stopped after {built} new fold(s), as report.max_new_folds asks: {k - 1} of "
                f"{len(folds)} folds are done",
                fix="run the same command again to go on (finished folds are kept)",
            )
        else:
            built += 1
            _note(f"finetune-cv: fold {k} of {len(folds)}: mining, judging, fine-tuning, encoding")
            _fold(ctx, unit, k=k, n=len(folds), dev=dev, X_dev=X_dev, train_idx=train_idx, labels=labels, frozen=frozen)
            pause_for_test(f"finetune-cv:fold-{k}-done")
        if distributed.is_main():
            (ctx.out / f"fold-{k}").mkdir()
            for name in ("dev.npy", "labels.npy", "taxonomy.npy", "fold.json", CLASSIFIER_FILE, CLASSIFIER_META):
                if (unit.folder / name).is_file():
                    os.link(unit.folder / name, ctx.out / f"fold-{k}" / name)  # the unit keeps its own
            summaries.append(read_json(unit.folder / "fold.json"))
    if not distributed.is_main():
        return {}
    summary = {
        "format": FOLDS_FORMAT,
        "folds": len(folds),
        "dev_ids_sha1": ids_sha1(dev),
        "held_out_ids_sha1": [s["held_out_ids_sha1"] for s in summaries],
        "triplets": [s["finetune"]["triplets"] for s in summaries],  # trained on (at most finetune.max_triplets)
        "finetune_seconds": round(sum(s["finetune"]["seconds"] for s in summaries), 1),
        "encode_seconds": round(sum(s["encode_seconds"] for s in summaries), 1),
        "llm_cost": round(sum(s["triplets"].get("llm_cost", 0.0) for s in summaries), 4),
    }
    write_json(ctx.out / "folds.json", summary)
    return {k: summary[k] for k in ("folds", "triplets", "finetune_seconds", "encode_seconds", "llm_cost")}


def _unit_identity(stage_key: str, dev: pd.DataFrame, held_out: np.ndarray) -> dict[str, str]:
    """A fold is current under the stage's key (config, inputs, models) for the same held-out rows."""
    return {"stage": stage_key, "held_out": ids_sha1(dev.iloc[held_out])}


def dry_run(config: PipelineConfig) -> dict[str, Any]:
    """What ``report`` would run for the recipe inside the CV, nothing run: the folds still to fine-tune and encode
    (a finished fold is kept), and, for the llm judge, the calls of their triplets net of the call cache (exact: it
    mines with the frozen vectors, which must exist).

    Returns:
        ``{"folds", "todo": [fold numbers], "llm": client.plan's estimate or None}``.
    """
    from jobembed.engine import Plan, unit_of
    from jobembed.sections import JudgeKind, JudgeMode
    from jobembed.triplets import client
    from jobembed.triplets.core import EXPECTED_COMPLETION_TOKENS, llm_job, mine

    splits, labels = judged_splits(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    dev = dev_pool(splits)
    X_dev = np.concatenate([frozen.train, frozen.val])
    folds = cv_folds(dev, n_folds=config.report.cv_folds, seed=config.prepare.seed)
    key = Plan(config).key("finetune-cv")
    folder = config.run_dir / "finetune-cv"
    todo = [
        k
        for k, (_, held_out) in enumerate(folds, 1)
        if not unit_of("finetune-cv", folder, f"fold-{k}", _unit_identity(key, dev, held_out)).current
    ]
    llm = None
    if JudgeKind(config.triplets.judge) is JudgeKind.llm:
        calls = []
        for k in todo:
            rest, inner = inner_slice(config, dev, folds[k - 1][0])
            frames = {"train": dev.iloc[rest].reset_index(drop=True), "val": dev.iloc[inner].reset_index(drop=True)}
            vectors = {"train": X_dev[rest], "val": X_dev[inner]}
            inputs = inputs_for(config, frames=frames, vectors=vectors, frozen=frozen, labels=labels)
            candidates, _ = mine(inputs, config.triplets)
            calls += llm_job(inputs, candidates, config.triplets).calls
        llm = client.plan(
            calls,
            config=config.triplets.llm,
            store=open_store(config.embed.cache_dir or default_cache_dir()),
            expected_completion_tokens=EXPECTED_COMPLETION_TOKENS[JudgeMode(config.triplets.llm.mode)],
        )
    return {"folds": len(folds), "todo": todo, "llm": llm}


def _note(message: str) -> None:
    if distributed.is_main():
        ui.note(message)


def _fold(
    ctx: StageContext,
    unit: Unit,
    *,
    k: int,
    n: int,
    dev: pd.DataFrame,
    X_dev: np.ndarray,
    train_idx: np.ndarray,
    labels: pd.DataFrame,
    frozen: Any,
) -> None:
    """Mine, judge, fine-tune and encode for one fold, into ``unit``'s folder (swapped in when all of it is done)."""
    config, f = ctx.config, ctx.config.finetune
    main, cpu = distributed.is_main(), finetune_on_cpu(config)
    rest, inner = inner_slice(config, dev, train_idx)
    frames = {"train": dev.iloc[rest].reset_index(drop=True), "val": dev.iloc[inner].reset_index(drop=True)}
    checkpoints = ctx.keep_dir("checkpoints") / unit.key
    on_labels = FinetuneLoss(f.loss).on_labels
    with unit.build() as tmp:
        mined: dict[str, Any] = {"judge": "none (labels)", "kept": 0}
        if main and not on_labels:
            inputs = inputs_for(
                config, frames=frames, vectors={"train": X_dev[rest], "val": X_dev[inner]}, frozen=frozen, labels=labels
            )
            mined = make_triplets(
                inputs=inputs,
                config=config.triplets,
                out_dir=tmp / "triplets",
                store=open_store(config.embed.cache_dir or default_cache_dir()),
                progress=ctx.progress,
            )
            train = mined["splits"]["train"]
            if train["kept"] < 2:  # the fold's folder is not kept on failure: say what its triplets report said
                raise DataError(
                    f"fold {k} of {n}: the {mined['judge']} judge kept {train['kept']} of {train['candidates']} "
                    "candidate triplets mined on the fold's training rows: too few to fine-tune on",
                    fix="loosen triplets.relative_margin, raise triplets.max_anchors_per_class, or use another "
                    "judge (`jobembed triplets RUN` shows what the run's own triplets kept, and why)",
                )
        distributed.wait_for_everyone(cpu=cpu)  # the other ranks read rank 0's triplets
        pause_for_test(f"finetune-cv:fold-{k}-mined")
        # a loss on labels trains on the fold's training ads outside the inner slice; triplets on what was mined there
        triplets, val = recipe_data(
            config, tmp / "triplets", frames["train"], labels, what=f"fold {k}'s training ads", seed=f.seed
        )
        if on_labels:
            mined["kept"] = len(triplets.frame)
        with tracking.unit(f"fold-{k}"):  # the fold's trainer curves apart from the other folds'
            info = run_recipe(
                config,
                triplets=triplets,
                val=val,
                centroid=centroid_data(config, frames),
                out_dir=tmp / "finetune",
                checkpoint_dir=checkpoints,
                final_dir=unit.folder / "finetune",
                progress=ctx.progress,
            )
        if main:
            model = tmp / "finetune" / "model"
            started = time.perf_counter()
            (dev_vectors,), label_vectors, taxonomy = encode_with(
                config, model, [dev], labels, taxonomy=taxonomy_rows(config)
            )
            encode_seconds = time.perf_counter() - started
            np.save(tmp / "dev.npy", dev_vectors)
            np.save(tmp / "labels.npy", label_vectors)
            if taxonomy is not None:
                np.save(tmp / "taxonomy.npy", taxonomy)
            keep_classifier(model, tmp)
            keep = bool(config.report.keep_fold_models)
            if not keep:
                shutil.rmtree(model)  # ~470 MB for a base-size encoder; its vectors are what the report reads
            llm = mined.get("llm") or {}
            write_json(
                tmp / "fold.json",
                {
                    "fold": k,
                    "of": n,
                    "rows": {
                        "triplet_train": len(rest),
                        "inner_slice": len(inner),
                        "held_out": len(dev) - len(train_idx),
                    },
                    "dev_ids_sha1": ids_sha1(dev),
                    "held_out_ids_sha1": ids_sha1(dev.drop(index=train_idx)),
                    "triplets": {
                        "judge": mined["judge"],
                        "kept": int(mined["kept"]),
                        "val": len(val.frame) if val is not None else 0,
                        "llm_cost": float(llm.get("cost", 0.0)),
                        "llm_calls": int(llm.get("answered", 0)),
                    },
                    "finetune": {key: info[key] for key in ("base_model", "loss", "steps", "seconds", "val")}
                    | {"triplets": int(info["triplets"]["rows"])},
                    "fingerprint": info["fingerprint"],
                    "encode_seconds": round(encode_seconds, 1),
                    "dim": int(dev_vectors.shape[1]),
                    "model_kept": keep,
                },
            )
    if main:
        shutil.rmtree(checkpoints, ignore_errors=True)


def fold_vectors(config: PipelineConfig, dev: pd.DataFrame, n_folds: int) -> list[FoldVectors]:
    """Every fold encoder's vectors of the dev pool, the category texts and the taxonomy's texts (None when the run
    has none), from the stage's folder, checked against ``dev``.

    Raises:
        DataError: the folder is missing or was made for other rows or another number of folds.
    """
    folder = config.run_dir / "finetune-cv"
    summary = folder / "folds.json"
    if not summary.is_file():
        raise DataError(
            f"{summary} not found", fix="run `jobembed report RUN --finetune-cv` (it runs finetune-cv first)"
        )
    meta = read_json(summary)
    if meta["folds"] != n_folds or meta["dev_ids_sha1"] != ids_sha1(dev):
        raise DataError(
            f"{folder} holds {meta['folds']} folds made for other rows than this report's {n_folds}",
            fix="re-run `jobembed report RUN` (finetune-cv re-runs when its inputs change)",
        )
    out = []
    for k in range(1, n_folds + 1):
        unit = folder / f"fold-{k}"
        taxonomy = unit / "taxonomy.npy"
        out.append(
            FoldVectors(
                dev=np.load(unit / "dev.npy"),
                labels=np.load(unit / "labels.npy"),
                taxonomy=np.load(taxonomy) if taxonomy.is_file() else None,
                classifier=read_classifier(unit),
            )
        )
    return out


def _needs_the_finetune_stage(config: PipelineConfig) -> None:
    if config.report.finetune_cv and not config.finetune.enabled:
        raise ValueError(
            "report.finetune_cv needs finetune.enabled: the fine-tuned systems' test figures and bundle use the "
            "finetune stage's model (`jobembed report RUN --finetune-cv` turns both on)"
        )


register_check(_needs_the_finetune_stage)


def _on(config: PipelineConfig) -> bool:
    return bool(config.report.finetune_cv)


def _off(config: PipelineConfig) -> str:
    return "report.finetune_cv is false; `jobembed report RUN --finetune-cv` turns it on"


register(
    Stage(
        "finetune-cv",
        reads=(
            "finetune",
            "triplets",
            "embed",
            "text_column",
            "clean.backend",
            "report.cv_folds",
            "prepare.seed",
            "head.validation_fraction",
            "head.seed",
        ),
        # what the fold fine-tunes do not read: whether the test-split fine-tune runs, an outside triplet file
        # (refused), the test-split protocol's seeds, other encoders
        ignores=("finetune.enabled", "finetune.triplets", "finetune.seeds", "embed.extra_models"),
        inputs=("prepare", "clean", "embed"),
        consumes=triplets_consume,  # it mines and judges as the triplets stage does
        run=_run,
        identity=_identity,
        products=("folds.json", "fold-*/*"),
        enabled=_on,
        off_reason=_off,
        keep=("checkpoints",),
        all_ranks=True,
        on_cpu=finetune_on_cpu,
        names_models=names_models,
        summarise=True,
        help="the fine-tuning recipe inside every CV fold: mine, judge, fine-tune, encode on its training rows",
    )
)
