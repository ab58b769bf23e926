"""finetune-seeds: the test-split protocol over fine-tuning seeds (``finetune-seeds/``). Off unless
``finetune.seeds`` names a seed besides ``finetune.seed``.

One fine-tune is one draw: on pl-jobads three seeds of the same recipe spread by ~0.01 macro-F1, as much as some
lifts. For every seed of ``finetune.seeds`` other than ``finetune.seed`` (the finetune stage's model, the one a
bundle serves), this stage applies the run's finetune section with that seed to the run's kept triplets (the
finetune stage's inputs: train for training, val for the checkpoint choice; with ``max_triplets`` the sample drawn
is the seed's too), and encodes every split and the category texts with the result. report then fits every system
on each seed's vectors and scores it once on the test split: each seed, the mean and spread, and exact McNemar per
seed against the same system on the frozen encoder and against TF-IDF + LR.

Each seed is a unit of the stage (``units/seed-<s>/``, keyed by the recipe and the seed, not by the list), so adding
a seed fine-tunes that seed alone and a killed run resumes with the seeds it finished; a seed left out of the list
keeps its unit. A seed's model and checkpoints are dropped once its vectors are written, unless
``finetune.keep_checkpoints``. Under ``torchrun`` every rank fine-tunes; rank 0 alone encodes and writes.

Outputs: ``seed-<s>/`` (``{train,val,test,labels}.npy``: float32, rows in split order; ``taxonomy.npy`` when the
systems train on the taxonomy's rows; the end-to-end classifier's layer with ``finetune.loss: classifier``;
``seed.json``; ``ads_seen.json``) and ``seeds.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobembed import distributed, tracking, ui
from jobembed.artifacts import hash_obj, read_json, write_json
from jobembed.data import SPLITS
from jobembed.embed import RunVectors
from jobembed.engine import Plan, Stage, StageContext, register
from jobembed.errors import DataError
from jobembed.finetune import CLASSIFIER_FILE, CLASSIFIER_META, read_classifier
from jobembed.stages._common import names_models, prepared, taxonomy_rows
from jobembed.stages.finetune import (
    centroid_data,
    encode_with,
    extra_seeds,
    finetune_consume,
    finetune_identity,
    finetune_on_cpu,
    keep_classifier,
    recipe_data,
    run_recipe,
    taxonomy_identity,
)

if TYPE_CHECKING:
    import pandas as pd

    from jobembed.config import PipelineConfig

SEEDS_FORMAT = "jobembed-finetune-seeds/1"
# The stage's version moves when how it assembles its folder from the units changes; a unit's key holds UNIT_VERSION,
# which moves only when what a unit holds changes, so a fix to the assembly never fine-tunes a kept seed again.
# 2: links taxonomy.npy and the classifier's layer, which version 1 left in the units (report then failed on a run
# with taxonomy rows and served no seed's e2e system).
STAGE_VERSION = 2
UNIT_VERSION = 1
# Every file of a unit that report reads (the optional ones when there).
_UNIT_FILES = (*(f"{s}.npy" for s in SPLITS), "labels.npy", "taxonomy.npy", "seed.json", "ads_seen.json")


def ids_sha1(frame: pd.DataFrame) -> str:
    return hash_obj(frame["id"].astype(str).tolist())


def _identity(config: PipelineConfig) -> dict[str, Any]:
    """The base encoder and prompts (as the finetune stage), and the seeds to fine-tune: a new seed re-runs the stage,
    whose units keep the seeds already done."""
    return finetune_identity(config) | {"seeds": extra_seeds(config)} | taxonomy_identity(config)


def _recipe_key(config: PipelineConfig) -> str:
    """The stage's key without its seeds: what a seed's unit is current under, beside its own seed."""
    f = config.finetune
    plan = Plan(config.model_copy(update={"finetune": f.model_copy(update={"seeds": []})}))
    return plan.key("finetune-seeds", version=UNIT_VERSION)


def _run(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    seeds, recipe = extra_seeds(config), _recipe_key(config)
    splits, labels = prepared(config)
    summaries = []
    for i, seed in enumerate(seeds, 1):
        unit = ctx.unit(f"seed-{seed}", identity={"recipe": recipe, "seed": seed})
        if unit.current:
            _note(f"finetune-seeds: seed {seed} ({i} of {len(seeds)}) up to date (kept)")
        else:
            _note(f"finetune-seeds: seed {seed} ({i} of {len(seeds)}): fine-tuning, encoding every split")
            _one_seed(ctx, unit, seed=seed, splits=splits, labels=labels)
        if distributed.is_main():
            (ctx.out / f"seed-{seed}").mkdir()
            for name in (*_UNIT_FILES, CLASSIFIER_FILE, CLASSIFIER_META):
                if (unit.folder / name).is_file():
                    os.link(unit.folder / name, ctx.out / f"seed-{seed}" / name)  # the unit keeps its own
            summaries.append(read_json(unit.folder / "seed.json"))
    if not distributed.is_main():
        return {}
    summary = {
        "format": SEEDS_FORMAT,
        "seeds": seeds,
        "finetune_seconds": round(sum(s["finetune"]["seconds"] for s in summaries), 1),
        "encode_seconds": round(sum(s["encode_seconds"] for s in summaries), 1),
    }
    write_json(ctx.out / "seeds.json", summary)
    return summary


def seeds_todo(config: PipelineConfig) -> list[int]:
    """The extra seeds whose fine-tune is not kept (for ``report --dry-run``); nothing runs."""
    from jobembed.engine import unit_of

    recipe, folder = _recipe_key(config), config.run_dir / "finetune-seeds"
    return [
        seed
        for seed in extra_seeds(config)
        if not unit_of("finetune-seeds", folder, f"seed-{seed}", {"recipe": recipe, "seed": seed}).current
    ]


def _note(message: str) -> None:
    if distributed.is_main():
        ui.note(message)


def _one_seed(ctx: StageContext, unit, *, seed: int, splits: dict[str, pd.DataFrame], labels: pd.DataFrame) -> None:
    """Fine-tune with ``seed`` and encode every split, into ``unit``'s folder (swapped in when all of it is done)."""
    config = ctx.config
    config = config.model_copy(update={"finetune": config.finetune.model_copy(update={"seed": seed})})
    f, main = config.finetune, distributed.is_main()
    triplets, val = recipe_data(  # as the finetune stage
        config, config.run_dir / "triplets", splits["train"], labels, what="the train split", seed=seed
    )
    checkpoints = ctx.keep_dir("checkpoints") / unit.key
    with unit.build() as tmp:
        with tracking.unit(f"seed-{seed}"):  # the seed's trainer curves apart from the other seeds'
            info = run_recipe(
                config,
                triplets=triplets,
                val=val,
                centroid=centroid_data(config, splits),
                out_dir=tmp / "finetune",
                checkpoint_dir=checkpoints,
                final_dir=unit.folder / "finetune",
                progress=ctx.progress,
            )
        if main:
            model = tmp / "finetune" / "model"
            started = time.perf_counter()
            vectors, label_vectors, taxonomy = encode_with(
                config, model, [splits[s] for s in SPLITS], labels, taxonomy=taxonomy_rows(config)
            )
            encode_seconds = time.perf_counter() - started
            for name, array in zip(SPLITS, vectors, strict=True):
                np.save(tmp / f"{name}.npy", array)
            np.save(tmp / "labels.npy", label_vectors)
            if taxonomy is not None:
                np.save(tmp / "taxonomy.npy", taxonomy)
            shutil.copyfile(tmp / "finetune" / "ads_seen.json", tmp / "ads_seen.json")
            keep_classifier(model, tmp)
            if not f.keep_checkpoints:
                shutil.rmtree(model)  # ~470 MB for a base-size encoder; its vectors are what the report reads
            write_json(
                tmp / "seed.json",
                {
                    "seed": seed,
                    "ids_sha1": {s: ids_sha1(splits[s]) for s in SPLITS},
                    "finetune": {key: info[key] for key in ("base_model", "loss", "steps", "seconds", "val")}
                    | {"triplets": int(info["triplets"]["rows"])},
                    "fingerprint": info["fingerprint"],
                    "encode_seconds": round(encode_seconds, 1),
                    "dim": int(label_vectors.shape[1]),
                    "model_kept": bool(f.keep_checkpoints),
                },
            )
    if main:
        shutil.rmtree(checkpoints, ignore_errors=True)


def seed_vectors(
    config: PipelineConfig, splits: dict[str, pd.DataFrame], *, like: RunVectors
) -> dict[int, tuple[RunVectors, set[str]]]:
    """Each extra seed's vectors of every split (with ``like``'s precision and prompt: the same embed settings) and
    the ids of the ads its triplets held, from the stage's folder, checked against ``splits``.

    Raises:
        DataError: the folder is missing, lacks a seed, or was made for other rows.
    """
    folder = config.run_dir / "finetune-seeds"
    out = {}
    for seed in extra_seeds(config):
        where = folder / f"seed-{seed}"
        if not (where / "seed.json").is_file():
            raise DataError(
                f"{where} not found (finetune.seeds asks for seed {seed})", fix="run `jobembed report RUN` again"
            )
        meta = read_json(where / "seed.json")
        if any(meta["ids_sha1"][s] != ids_sha1(splits[s]) for s in SPLITS):
            raise DataError(f"{where} was made for other rows than this run's splits", fix="run `jobembed report RUN`")
        names = (*SPLITS, "labels", *(("taxonomy",) if (where / "taxonomy.npy").is_file() else ()))
        vectors = {s: np.load(where / f"{s}.npy", allow_pickle=False) for s in names}
        run_vectors = RunVectors(
            model=str(Path(where) / "model"),
            fingerprint=str(meta["fingerprint"]),
            precision=like.precision,
            text_prompt=like.text_prompt,
            **vectors,
        )
        run_vectors.classifier = read_classifier(where)
        out[seed] = (run_vectors, {str(i) for i in read_json(where / "ads_seen.json")})
    return out


def _on(config: PipelineConfig) -> bool:
    return bool(config.finetune.enabled and extra_seeds(config))


def _off(config: PipelineConfig) -> str:
    if not config.finetune.enabled:
        return "finetune.enabled is false"
    return "finetune.seeds names no seed besides finetune.seed; e.g. `jobembed finetune RUN --seeds 13,14,15`"


register(
    Stage(
        "finetune-seeds",
        reads=("finetune", "embed", "text_column"),
        # finetune.seed is the finetune stage's model (each unit has its own seed); the seed list is in the identity
        # so that a unit's key is the recipe's and its seed, not the list's
        ignores=("finetune.enabled", "finetune.seed", "finetune.seeds", "embed.extra_models"),
        inputs=("prepare", "clean", "triplets"),
        consumes=finetune_consume,  # it trains on what the finetune stage trains on
        run=_run,
        identity=_identity,
        products=("seeds.json", "seed-*/*"),
        enabled=_on,
        off_reason=_off,
        keep=("checkpoints",),
        all_ranks=True,
        on_cpu=finetune_on_cpu,
        names_models=names_models,
        summarise=True,
        version=STAGE_VERSION,
        help="the fine-tune again for every other seed of finetune.seeds, every split re-encoded (test protocol)",
    )
)
