"""finetune: fine-tune the encoder on the kept triplets (``finetune/``); embed-finetuned: encode every split with
it (``embed-finetuned/``). Both are off unless ``finetune.enabled``."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pandas as pd
import typer

from jobembed import distributed, embed, encoders
from jobembed.artifacts import file_sha256, read_json
from jobembed.cli.base import (
    ConfigOpt,
    DeviceOpt,
    ForceOpt,
    MaxLenOpt,
    PrecisionOpt,
    QuietOpt,
    RunArg,
    console,
    friendly,
    int_list,
    seed_list,
    stage_command,
)
from jobembed.config import register_check, register_section, write_resolved
from jobembed.engine import KeepStamp, Stage, StageContext, register, register_pin
from jobembed.errors import DataError
from jobembed.finetune import LabelledRows, Triplets, finetune, labelled_rows, load_triplets, read_classifier
from jobembed.sections import FinetuneConfig, FinetuneLoss
from jobembed.stages._common import (
    canon,
    embed_into,
    names_models,
    prepared,
    reads_clean_text,
    taxonomy_rows,
    trains_on_taxonomy,
)

if TYPE_CHECKING:
    import numpy as np

    from jobembed.config import PipelineConfig


register_section("finetune", FinetuneConfig)


def finetune_base(config: PipelineConfig) -> str:
    return config.finetune.model or config.embed.model


def protocol_seeds(config: PipelineConfig) -> list[int]:
    """The seeds of the test-split protocol: ``finetune.seed`` (the bundled model) first, then the others of
    ``finetune.seeds`` in their order, each once."""
    f = config.finetune
    return list(dict.fromkeys([f.seed, *f.seeds]))


def extra_seeds(config: PipelineConfig) -> list[int]:
    """The seeds this stage fine-tunes: those of the protocol besides ``finetune.seed``."""
    return protocol_seeds(config)[1:]


def finetune_identity(config: PipelineConfig) -> dict[str, Any]:
    """The base encoder's content, the prompts it trains with (from the embed section or the encoder's family), and
    an outside triplet file's content (the run's own triplets are an input stage)."""
    f, e = config.finetune, config.embed
    base = finetune_base(config)
    out: dict[str, Any] = {
        "base": encoders.model_fingerprint(base, cache_dir=e.cache_dir),
        "prompts": list(encoders.resolve_prompts(canon(base, e.cache_dir), e.text_prompt, e.label_prompt)),
    }
    if f.triplets is not None:
        if not Path(f.triplets).is_file():
            raise KeepStamp(f"the --triplets file {f.triplets} is not found", fix="check the path")
        out["triplets"] = file_sha256(Path(f.triplets))
    return out


def finetune_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    """A loss on labels reads the training ads (prepare, clean), no triplets."""
    own = ("val.parquet",) if config.finetune.triplets else ("train.parquet", "val.parquet")
    out: dict[str, tuple[str, ...]] = {"prepare": ("*",)}
    if not FinetuneLoss(config.finetune.loss).on_labels:
        out["triplets"] = own
    if reads_clean_text(config):
        out["clean"] = ("*",)
    return out


def _pin_finetune(config: PipelineConfig) -> PipelineConfig:
    f = config.finetune
    if f.model is None:
        return config
    return config.model_copy(
        update={"finetune": f.model_copy(update={"model": canon(f.model, config.embed.cache_dir)})}
    )


def training_rows(
    config: PipelineConfig, frame: pd.DataFrame, labels: pd.DataFrame, *, what: str, seed: int | None = None
) -> LabelledRows:
    """The ads of ``frame`` with their labels, for a loss on labels (``finetune.max_triplets`` caps them)."""
    f = config.finetune
    if f.triplets is not None:
        raise DataError(
            f"finetune.loss {f.loss} trains on the run's labelled ads, but finetune.triplets names a triplet file "
            f"({f.triplets})",
            fix="unset finetune.triplets, or pick a triplet loss (mnrl, cached_mnrl, gist, triplet)",
        )
    return labelled_rows(
        frame[str(config.text_column)].tolist(),
        frame["label"].astype(str).tolist(),
        classes=labels["label"].astype(str).tolist(),
        ids=frame["id"].astype(str).tolist(),
        what=what,
        limit=f.max_triplets,
        seed=f.seed if seed is None else seed,
    )


def recipe_data(
    config: PipelineConfig, triplets_dir: Path, frame: pd.DataFrame, labels: pd.DataFrame, *, what: str, seed: int
) -> tuple[Triplets | LabelledRows, Triplets | None]:
    """What the run's recipe trains on, and its validation triplets: the labelled ads of ``frame`` for a loss on
    labels; else the triplets of ``triplets_dir`` (or ``finetune.triplets``) with that folder's val triplets."""
    f = config.finetune
    if FinetuneLoss(f.loss).on_labels:
        return training_rows(config, frame, labels, what=what, seed=seed), None
    classes = labels["label"].astype(str).tolist()
    source = Path(f.triplets) if f.triplets else triplets_dir / "train.parquet"
    triplets = load_triplets(source, classes=classes, limit=f.max_triplets, seed=seed)
    val_file = triplets_dir / "val.parquet"
    val = None
    if val_file.is_file() and len(pd.read_parquet(val_file)) >= 2:
        val = load_triplets(val_file, classes=triplets.classes)
    return triplets, val


def centroid_data(config: PipelineConfig, splits) -> dict[str, list[str]] | None:
    """The CentroidEvaluator's data: the val ads and a stratified sample of ``finetune.eval_train_ads`` training ads
    (re-encoded at every evaluation, so a sample, not all of train); None without a val split."""
    f, column = config.finetune, str(config.text_column)
    train, val_ads = splits["train"], splits["val"]
    if not len(val_ads):
        return None
    rows = [
        g.sample(n=min(len(g), max(1, f.eval_train_ads * len(g) // len(train))), random_state=f.seed).index
        for _, g in train.groupby("label")
    ]
    keep = train.loc[[i for index in rows for i in index]]
    return {
        "train_texts": keep[column].tolist(),
        "train_labels": keep["label"].tolist(),
        "val_texts": val_ads[column].tolist(),
        "val_labels": val_ads["label"].tolist(),
    }


def _run_finetune(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the encoder on the run's kept triplets (or finetune.triplets); evaluate on the val split.

    Checkpoints go to ``finetune/checkpoints/<stage key>/``, outside the swapped outputs: a killed run resumes from
    its own, and never from those of other settings. They are dropped once the model is in place, unless
    ``keep_checkpoints``.
    """
    config = ctx.config
    f = config.finetune
    splits, labels = prepared(config)
    triplets, val = recipe_data(
        config, config.run_dir / "triplets", splits["train"], labels, what="the train split", seed=f.seed
    )
    checkpoints = ctx.keep_dir("checkpoints") / ctx.key
    info = run_recipe(
        config,
        triplets=triplets,
        val=val,
        centroid=centroid_data(config, splits),
        out_dir=ctx.out,
        checkpoint_dir=checkpoints,
        final_dir=ctx.folder,
        progress=ctx.progress,
    )
    if distributed.is_main():
        write_resolved(f, ctx.out)
        if not f.keep_checkpoints:
            ctx.after_commit(lambda: _drop_checkpoints(checkpoints))
    return {k: info[k] for k in ("base_model", "fingerprint", "loss", "steps", "seconds", "val", "resumed_from")} | {
        "data": info["data"],
        "triplets": info["triplets"]["rows"],
        "judge": info["triplets"]["judge"],
    }


def run_recipe(
    config: PipelineConfig,
    *,
    triplets: Triplets | LabelledRows,
    val: Triplets | None,
    centroid: dict[str, list[str]] | None,
    out_dir: Path,
    checkpoint_dir: Path,
    final_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """The run's finetune section applied to ``triplets`` (``val`` and ``centroid`` for the checkpoint choice) on
    its base encoder with the prompts embed uses; returns finetune.json. The finetune stage and each CV fold of
    finetune-cv call it."""
    f = config.finetune
    model_ref = finetune_base(config)
    resolved = encoders.resolve(model_ref, cache_dir=config.embed.cache_dir)
    text_prompt, label_prompt = encoders.resolve_prompts(
        resolved.ref, config.embed.text_prompt, config.embed.label_prompt
    )
    return finetune(
        triplets=triplets,
        val_triplets=val,
        centroid_data=centroid,
        config=f.model_copy(update={"cache_dir": f.cache_dir or config.embed.cache_dir}),
        model_ref=model_ref,
        text_prompt=text_prompt,
        label_prompt=label_prompt,
        out_dir=out_dir,
        checkpoint_dir=checkpoint_dir,
        final_dir=final_dir,
        progress=progress,
    )


def encode_with(
    config: PipelineConfig,
    model: Path,
    frames: Sequence[pd.DataFrame],
    labels: pd.DataFrame,
    *,
    taxonomy: pd.DataFrame | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """The run's text of each frame, the category texts and the taxonomy's texts (when given) with the fine-tuned
    ``model``, as embed encodes them (its length, chunking and precision; the prompts the fine-tune trained with). No
    cache: a fold's or a seed's model is dropped once its vectors are written.

    Returns:
        (one array per frame, category vectors, taxonomy vectors or None).
    """
    section = config.embed.model_copy(update={"model": str(model), "extra_models": []})
    text_prompt, label_prompt = encoders.resolve_prompts(str(model), section.text_prompt, section.label_prompt)
    texts = embed.Embedder(section, prompt=text_prompt, model=str(model), cache=False)
    label = (
        texts
        if label_prompt == text_prompt
        else embed.Embedder(section, prompt=label_prompt, model=str(model), cache=False)
    )
    out = [texts.encode(frame[str(config.text_column)].tolist(), progress=False) for frame in frames]
    mode = str(section.label_text)
    extra = None if taxonomy is None else texts.encode(taxonomy["text"].astype(str).tolist(), progress=False)
    return out, embed.label_vectors(label, embed.label_texts(labels, mode), mode=mode), extra


def keep_classifier(model: Path, unit: Path) -> None:
    """Copy the end-to-end classifier's layer (loss ``classifier``) out of a fold's or a seed's model folder before the
    folder is dropped: the report's ``e2e`` system reads it there (``read_classifier(unit)``)."""
    from jobembed.finetune import CLASSIFIER_FILE, CLASSIFIER_META

    for name in (CLASSIFIER_FILE, CLASSIFIER_META):
        if (model / name).is_file():
            shutil.copyfile(model / name, unit / name)


def taxonomy_identity(config: PipelineConfig) -> dict[str, str]:
    """For the stages that encode with a fine-tuned model: where the systems train on the taxonomy's rows, its texts
    are encoded too."""
    return {"taxonomy_rows": "encoded"} if trains_on_taxonomy(config) else {}


def _drop_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def finetune_on_cpu(config: PipelineConfig) -> bool:
    return encoders.pick_device(config.finetune.device) == "cpu"


def finetuned_model(config: PipelineConfig) -> str:
    """The fine-tuned encoder's folder (a local model reference)."""
    return str(config.run_dir / "finetune" / "model")


def finetuned_vectors(config: PipelineConfig, splits, labels) -> embed.RunVectors:
    """The fine-tuned encoder's vectors of every split (``embed-finetuned``'s folder)."""
    vectors = embed.load_vectors(
        config.run_dir / "embed-finetuned",
        model=finetuned_model(config),
        config=config.embed,
        splits=splits,
        labels=labels,
        text_column=config.text_column,
        taxonomy=taxonomy_rows(config),
    )
    vectors.classifier = read_classifier(Path(finetuned_model(config)))
    return vectors


def _finetuned_identity(config: PipelineConfig) -> dict[str, str]:
    """The fine-tuned model's content fingerprint (new weights under the same settings are a new encoder), and whether
    the taxonomy's texts are encoded too."""
    model = Path(finetuned_model(config))
    return {"model": encoders.model_fingerprint(str(model)) if model.is_dir() else "missing"} | taxonomy_identity(
        config
    )


def _embed_finetuned_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    out = {"prepare": ("*",), "finetune": ("model/*",)}
    if reads_clean_text(config):
        out["clean"] = ("*",)
    return out


def _run_embed_finetuned(ctx: StageContext) -> dict[str, Any]:
    """Encode every split and the category texts with the fine-tuned encoder (its own folder of vectors)."""
    config = ctx.config
    return embed_into(ctx, config.embed.model_copy(update={"model": finetuned_model(config), "extra_models": []}))


def _finetune_on(config: PipelineConfig) -> bool:
    return bool(config.finetune.enabled)


def _finetune_off(config: PipelineConfig) -> str:
    return "finetune.enabled is false; `jobembed finetune RUN` turns it on"


def _labels_or_triplets(config: PipelineConfig) -> None:
    f = config.finetune
    if FinetuneLoss(f.loss).on_labels and f.triplets is not None:
        raise ValueError(
            f"finetune.loss {f.loss} trains on the run's labelled ads, but finetune.triplets names a triplet file "
            f"({f.triplets}); unset finetune.triplets, or pick a triplet loss (mnrl, cached_mnrl, gist, triplet)"
        )


register_check(_labels_or_triplets)
register_pin(_pin_finetune)


@friendly
def finetune_command(
    ctx: typer.Context,
    run_dir: RunArg,
    finetune__model: Annotated[
        str | None,
        typer.Option("--base-model", help="Encoder to fine-tune (default: embed.model, the frozen one)."),
    ] = None,
    finetune__triplets: Annotated[
        Path | None, typer.Option("--triplets", help="A Parquet with anchor, positive, negative (default: the run's).")
    ] = None,
    finetune__loss: Annotated[
        FinetuneLoss | None, typer.Option("--loss", help="Training loss: on triplets, or on labelled ads.")
    ] = None,
    finetune__class_aware: Annotated[
        bool | None, typer.Option("--class-aware/--no-class-aware", help="mnrl: no same-class in-batch negatives.")
    ] = None,
    finetune__triplet_margin: Annotated[
        float | None,
        typer.Option("--triplet-margin", help="batch_hard, batch_all, triplet: the hinge's margin (default: 5)."),
    ] = None,
    finetune__epochs: Annotated[float | None, typer.Option("--epochs", min=0.01, help="Training epochs.")] = None,
    finetune__batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=2, help="Triplets (or labelled ads) per training step.")
    ] = None,
    finetune__learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", help="AdamW learning rate.")
    ] = None,
    finetune__max_seq_length: MaxLenOpt = None,
    finetune__max_triplets: Annotated[
        int | None, typer.Option("--max-triplets", min=2, help="Train on at most this many triplets.")
    ] = None,
    finetune__matryoshka_dims: Annotated[
        str | None, typer.Option("--matryoshka-dims", callback=int_list, help="e.g. 384,256,128.")
    ] = None,
    finetune__gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Save GPU memory.")
    ] = None,
    finetune__precision: PrecisionOpt = None,
    finetune__device: DeviceOpt = None,
    finetune__pretokenize: Annotated[
        bool | None, typer.Option("--pretokenize/--no-pretokenize", help="Tokenise every text once, up front.")
    ] = None,
    finetune__group_by_length: Annotated[
        bool | None,
        typer.Option("--group-by-length/--no-group-by-length", help="Batches of similar-length triplets."),
    ] = None,
    finetune__compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (long GPU runs).")
    ] = None,
    finetune__dataloader_workers: Annotated[
        int | None, typer.Option("--dataloader-workers", min=0, help="Data loader worker processes.")
    ] = None,
    finetune__seed: Annotated[int | None, typer.Option("--seed", help="Training seed (of the bundled model).")] = None,
    finetune__seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            callback=seed_list,
            help="e.g. 13,14,15: fine-tune once more per seed besides --seed (finetune-seeds); report shows each seed "
            "on test with McNemar per seed.",
        ),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune the encoder with SentenceTransformerTrainer, on the run's triplets or on its labelled ads.

    By default on the run's kept triplets (MNRL with the hard negative, same-class in-batch negatives masked), or with
    --loss classifier | batch_hard | batch_all on every training ad with its label (no triplets: classifier trains a
    linear layer with the encoder, kept beside the model as the report's e2e system; batch_hard/batch_all are
    sentence-transformers' label-based triplet losses). Keeps the checkpoint with the best validation centroid-cosine
    macro-F1; after an interruption it resumes from the newest complete checkpoint made under the same settings
    (RUN/finetune/checkpoints/<stage key>/). Writes RUN/finetune/ (model/ with its model card, finetune.json,
    ads_seen.json, log.jsonl) in one swap; the embed-finetuned stage then writes RUN/embed-finetuned/ (the fine-tuned
    vectors report reads). With --seeds, the finetune-seeds stage then fine-tunes once more for every other seed on the
    same training rows and encodes every split with each (RUN/finetune-seeds/; each seed's model is dropped once
    encoded), so that report can show the fine-tuned systems seed by seed on the test split. Turns finetune on for the
    run (finetune.enabled, kept in its config.yaml)."""
    params = dict(locals())
    params["finetune__enabled"] = True  # asking for the stage turns it on for this run (kept in its config.yaml)
    from jobembed.config import load_config

    run = stage_command("finetune", params)
    seeds = extra_seeds(load_config(run / "config.yaml"))
    if seeds:
        stage_command("finetune-seeds", params)
    info = read_json(run / "finetune" / "finetune.json")
    val = info["val"]
    score = val.get("eval_val-centroid_macro_f1")
    data = (
        f"{info['triplets']['rows']} labelled ads"
        if info.get("data") == "labels"
        else f"{info['triplets']['rows']} triplets ({info['triplets']['judge']})"
    )
    console.print(
        f"[green]fine-tuned[/] {info['base_model']} on {data}, {info['loss']}, {info['steps']} steps in "
        f"{info['seconds']} s"
        + (f"; validation centroid macro-F1 {score:.3f}" if score is not None else "")
        + f" → {run / 'finetune' / 'model'}"
    )
    if seeds:
        done = read_json(run / "finetune-seeds" / "seeds.json")
        console.print(
            f"[green]fine-tuned[/] seeds {', '.join(map(str, seeds))} as well ({done['finetune_seconds']:.0f} s of "
            f"fine-tuning) → {run / 'finetune-seeds'}; `jobembed report {run}` scores every seed on test"
        )


register(
    Stage(
        "finetune",
        section="finetune",
        reads=("text_column",),
        ignores=("finetune.seeds",),  # the other seeds are finetune-seeds' fine-tunes
        inputs=("prepare", "clean", "triplets"),
        consumes=finetune_consume,
        run=_run_finetune,
        identity=finetune_identity,
        products=("model/*", "ads_seen.json"),
        enabled=_finetune_on,
        off_reason=_finetune_off,
        keep=("checkpoints",),
        all_ranks=True,
        on_cpu=finetune_on_cpu,
        names_models=names_models,
        summarise=True,
        help="fine-tune the encoder on the kept triplets or the labelled ads (SentenceTransformerTrainer); best val "
        "checkpoint kept",
        command=finetune_command,
    )
)

register(
    Stage(
        "embed-finetuned",
        reads=("embed", "text_column"),
        ignores=("embed.model", "embed.extra_models"),
        inputs=("prepare", "clean", "finetune"),
        consumes=_embed_finetuned_consume,
        run=_run_embed_finetuned,
        identity=_finetuned_identity,
        products=("*/*.npy", "*/embeddings.json"),
        enabled=_finetune_on,
        off_reason=_finetune_off,
        names_models=names_models,
        help="encode every split with the fine-tuned encoder (when finetune.enabled)",
    )
)
