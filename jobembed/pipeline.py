"""The stage graph: every stage declared once, registered with the engine (``jobembed.engine``).

Each ``Stage`` names the config it reads, the stages whose files it reads (and which files), the folder it writes
and what else its result depends on; the engine keys, stamps, locks and swaps. The graph today::

    prepare ──▶ clean ──▶ embed ──▶ head
                             ├────▶ triplets ──▶ finetune ──▶ embed-finetuned ──┐
                             └──────────────────────────────────────────────────┴─▶ report ──▶ bundle

``finetune`` and ``embed-finetuned`` are off unless ``finetune.enabled`` (``jobembed finetune RUN`` turns it on);
off, they neither run nor are read, and their folders are left as they are.

Run folder (``runs/<name>/``), each stage writing only its own folder, whole (see ``jobembed.engine``)::

    config.yaml        the resolved pipeline config; later commands on the run start from it
    manifest.json      per stage: resolved config, input digests, code version, package versions, git commit
    prepare/           {train,val,test}.parquet, labels.json, data_card.json, config.yaml, stage.json
    clean/             {train,val,test}.parquet (id, clean_text, clean_source, spans), report.md/json, config.yaml
    embed/             <encoder>-<fingerprint>/{train,val,test,labels}.npy + embeddings.json; stage.json
    triplets/          {train,val}.parquet (kept), candidates/, noise.csv, report.md/json
    finetune/          model/ (with its model card), finetune.json, log.jsonl, ads_seen.json; checkpoints/<key>/
    embed-finetuned/   the fine-tuned encoder's vectors, laid out like embed/
    head/              bundle of the MLP head on embed.model; stage.json
    report/            report.md, metrics.json, per_class/, figures/, winner/; stage.json
    bundle/            the deployable bundle of the report's winner (bundle); stage.json
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from jobembed import data, distributed, embed, encoders, metrics
from jobembed.artifacts import file_sha256, read_json
from jobembed.bundle import EncoderInfo, load_head, save_bundle
from jobembed.clean.core import Cleaner, clean_splits, load_clean_column
from jobembed.clean.gliner import WINDOWS_VERSION
from jobembed.config import (
    BundleEncoderChoice,
    CleanBackend,
    PipelineConfig,
    TextColumn,
    default_cache_dir,
    load_config,
    write_resolved,
)
from jobembed.engine import STAGES, KeepStamp, Stage, StageContext, register, register_pin, run_stages
from jobembed.engine import check_run_dir as check_run_dir
from jobembed.engine import pin_models as pin_models
from jobembed.errors import ConfigError, DataError
from jobembed.evaluate import evaluate_finetuned, evaluate_systems
from jobembed.finetune import finetune, load_triplets
from jobembed.head import MLPHead
from jobembed.report import WINNER_DIR, WINNER_FINETUNED_DIR, write_report
from jobembed.store import open_store
from jobembed.triplets import core as triplets_core
from jobembed.triplets.core import TripletInputs, make_triplets

__all__ = ["STAGES", "check_run_dir", "config_for_run", "pin_models", "run_stages"]


def _cleaned(config: PipelineConfig) -> bool:
    return config.text_column == TextColumn.clean_text


def _encoder_part(config: PipelineConfig, ref: str) -> tuple[str, ...]:
    """The embed folder of one encoder, as a pattern of embed's files."""
    resolved = encoders.resolve(ref, cache_dir=config.embed.cache_dir)
    return (f"{embed.encoder_slug(resolved.ref, encoders.fingerprint_of(resolved))}/*",)


# ------------------------------------------------------------------------------------------- prepare


def _prepare_identity(config: PipelineConfig) -> dict[str, str]:
    p = config.prepare
    if p.input is None:
        raise KeepStamp(
            f"{config.run_dir} has no prepared splits, and no input file is set (prepare.input)",
            fix=f"run `jobembed prepare {config.run_dir} --input ADS.csv` first",
        )
    if Path(p.input).is_dir():
        raise KeepStamp(
            f"the --input {p.input} (prepare.input) is a folder, not a file",
            fix="pass the ads file itself (CSV, JSONL or Parquet), e.g. --input data/ads.csv",
        )
    if not Path(p.input).is_file():
        raise KeepStamp(
            f"the --input file {p.input} (prepare.input) is not found",
            fix=f"check the path (relative paths start at {Path.cwd()}), or pass --input",
        )
    out = {"input": file_sha256(Path(p.input))}
    if p.labels is not None and Path(p.labels.path).is_file():
        out["labels"] = file_sha256(Path(p.labels.path))
    return out


def _run_prepare(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    if config.prepare.input is None:
        raise ConfigError(
            "prepare needs an input file", fix="pass --input (CSV, JSONL or Parquet) or set prepare.input"
        )
    result = data.prepare(config=config.prepare, out_dir=ctx.out, progress=ctx.progress)
    return {"card": result.card}


# ------------------------------------------------------------------------------------------- clean


def _clean_identity(config: PipelineConfig) -> dict[str, object]:
    """The cleaner's backend, pattern files and (gliner2) model fingerprint, schema and windowing version.

    The windowing version is here rather than in the stage's code version so that only gliner2 runs re-clean
    when windows change (rules runs, and everything downstream of them, keep their keys).
    """
    info = Cleaner(config.clean).info()
    if info["backend"] == str(CleanBackend.gliner2):
        info["windows_version"] = WINDOWS_VERSION
    return info


def _run_clean(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    splits = data.load_splits(config.run_dir / "prepare")
    report = clean_splits(splits=splits, config=config.clean, out_dir=ctx.out, progress=ctx.progress)
    write_resolved(config.clean, ctx.out)
    return {k: report[k] for k in ("sources", "fallbacks", "empty_outputs", "mean_chars", "seconds")} | {
        "pii_rows": report["pii_check"]["rows_with_pii"]
    }


def _pin_clean(config: PipelineConfig) -> PipelineConfig:
    if config.clean.backend != CleanBackend.gliner2:
        return config
    return config.model_copy(update={"clean": config.clean.model_copy(update={"model": _canon(config.clean.model)})})


# ------------------------------------------------------------------------------------------- embed


def _canon(ref: str, cache_dir: Path | None = None) -> str:
    """A model reference in canonical form: builtins in lower case, Hub ids pinned to a commit, folders as given."""
    resolved = encoders.resolve(ref, cache_dir=cache_dir, build=False)
    return ref if resolved.kind == "local" else resolved.ref


def _pin_embed(config: PipelineConfig) -> PipelineConfig:
    """Done once, before the first stage that names a model, and written to the run's config.yaml, so every later
    stage (and the bundle) uses the same weights even if the Hub's ``main`` moves on."""
    e = config.embed
    pinned = e.model_copy(
        update={
            "model": _canon(e.model, e.cache_dir),
            "extra_models": [_canon(r, e.cache_dir) for r in e.extra_models],
        }
    )
    return config.model_copy(update={"embed": pinned})


def _embed_identity(config: PipelineConfig) -> dict[str, str]:
    """The content fingerprint of every encoder: a folder rebuilt in place with other weights is a new model."""
    return {ref: encoders.model_fingerprint(ref, cache_dir=config.embed.cache_dir) for ref in config.embed.models()}


def _prepared(config: PipelineConfig, *, texts: bool = True):
    """Prepare's splits and labels; with ``text_column: clean_text`` (and ``texts``) each split gains the clean
    stage's column."""
    prepare_dir = config.run_dir / "prepare"
    splits = data.load_splits(prepare_dir)
    if texts and _cleaned(config):
        for name, frame in splits.items():
            frame["clean_text"] = load_clean_column(config.run_dir / "clean", name, frame["id"]).to_numpy()
    return splits, data.load_labels(prepare_dir)


def _embed_into(ctx: StageContext, section: Any) -> dict[str, Any]:
    """Every split and the category texts encoded with ``section``'s encoders into the stage's folder."""
    splits, labels = _prepared(ctx.config)
    folders = embed.embed_splits(
        splits=splits,
        labels=labels,
        out_dir=ctx.out,
        config=section,
        text_column=ctx.config.text_column,
        progress=ctx.progress,
    )
    return {"folders": {k: v.name for k, v in folders.items()}}


def _run_embed(ctx: StageContext) -> dict[str, Any]:
    summary = _embed_into(ctx, ctx.config.embed)
    write_resolved(ctx.config.embed, ctx.out)
    return summary


def _vectors(config: PipelineConfig, model: str, splits, labels) -> embed.RunVectors:
    return embed.load_vectors(
        config.run_dir / "embed",
        model=model,
        config=config.embed,
        splits=splits,
        labels=labels,
        text_column=config.text_column,
    )


def _encoder_info(config: PipelineConfig, vectors: embed.RunVectors) -> EncoderInfo:
    return EncoderInfo(
        model=vectors.model,
        fingerprint=vectors.fingerprint,
        precision=vectors.precision,
        text_prompt=vectors.text_prompt,
        max_seq_length=config.embed.max_seq_length,
    )


# ------------------------------------------------------------------------------------------- head


def _run_train_head(ctx: StageContext) -> dict[str, Any]:
    """Fit the MLP head on train (early stopping on val), report validation metrics, save a bundle in ``head/``.

    The test split is not read here: it is scored once, by report.
    """
    config = ctx.config
    splits, labels = _prepared(config, texts=False)  # the head reads vectors and labels, not texts
    vectors = _vectors(config, config.embed.model, splits, labels)
    y = {name: frame["label"].to_numpy(dtype=str) for name, frame in splits.items()}
    has_val = len(splits["val"]) > 0
    head = MLPHead.from_config(config.head).set_params(verbose=1 if ctx.progress else 0)
    head.fit(
        vectors.train,
        y["train"],
        X_val=vectors.val if has_val else None,
        y_val=y["val"] if has_val else None,
        groups=None if has_val else splits["train"]["group"].to_numpy(),
    )
    val = (
        metrics.classification_metrics(y["val"], head.predict(vectors.val), min_support=config.report.min_support)
        if has_val
        else {"held_out_macro_f1": head.best_val_score_}
    )
    save_bundle(
        ctx.out,
        model=head,
        system="mlp",
        encoder=_encoder_info(config, vectors),
        config=config,
        labels=labels,
        metrics={"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_},
    )
    return {"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_}


# ------------------------------------------------------------------------------------------- triplets


def triplet_inputs(config: PipelineConfig) -> TripletInputs:
    """What triplets reads: train/val frames, their texts (the run's and the judge's), frozen vectors."""
    splits, labels = _prepared(config)
    vectors = _vectors(config, config.embed.model, splits, labels)
    column = str(config.text_column)
    cleaned = config.clean.backend != CleanBackend.none
    judge_texts = {}
    for name in ("train", "val"):
        frame = splits[name]
        if cleaned and "clean_text" not in frame:
            frame["clean_text"] = load_clean_column(config.run_dir / "clean", name, frame["id"]).to_numpy()
        judge_texts[name] = frame["clean_text" if cleaned else "text"]
    return TripletInputs(
        frames={n: splits[n] for n in ("train", "val")},
        texts={n: splits[n][column] for n in ("train", "val")},
        judge_texts=judge_texts,
        judge_reads="clean_text" if cleaned else "text",
        labels=labels,
        vectors={"train": vectors.train, "val": vectors.val},
        label_vectors=vectors.labels,
        encoder=vectors.model,
        fingerprint=vectors.fingerprint,
    )


def _triplets_identity(config: PipelineConfig) -> dict[str, str]:
    """The frozen encoder that mined the candidates, and the judge's prompt templates (edited prompts re-judge)."""
    prompts = sorted((Path(triplets_core.__file__).parent / "prompts").glob("*.txt"))
    return _head_identity(config) | {p.name: file_sha256(p) for p in prompts}


def _head_identity(config: PipelineConfig) -> dict[str, str]:
    return {"model": encoders.model_fingerprint(config.embed.model, cache_dir=config.embed.cache_dir)}


def _triplets_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    out = {"prepare": ("*",), "embed": _encoder_part(config, config.embed.model)}
    if _cleaned(config) or config.clean.backend != CleanBackend.none:  # the judge reads cleaned text
        out["clean"] = ("*",)
    return out


def _run_make_triplets(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    report = make_triplets(
        inputs=triplet_inputs(config),
        config=config.triplets,
        out_dir=ctx.out,
        store=open_store(config.embed.cache_dir or default_cache_dir()),
        progress=ctx.progress,
    )
    write_resolved(config.triplets, ctx.out)
    out = {"judge": report["judge"], "kept": report["kept"], "noise": report["noise"]["ads"]}
    if "llm" in report:
        keys = ("calls", "cached", "answered", "unparsable", "failed", "prompt_tokens", "completion_tokens", "cost")
        out["llm"] = {k: report["llm"][k] for k in keys} | {"model": report["llm"]["model"]}
    return out


# ------------------------------------------------------------------------------------------- finetune


def _finetune_base(config: PipelineConfig) -> str:
    return config.finetune.model or config.embed.model


def _finetune_identity(config: PipelineConfig) -> dict[str, Any]:
    """The base encoder's content, the prompts it trains with (from the embed section or the encoder's family), and
    an outside triplet file's content (the run's own triplets are an input stage)."""
    f, e = config.finetune, config.embed
    base = _finetune_base(config)
    out: dict[str, Any] = {
        "base": encoders.model_fingerprint(base, cache_dir=e.cache_dir),
        "prompts": list(encoders.resolve_prompts(_canon(base, e.cache_dir), e.text_prompt, e.label_prompt)),
    }
    if f.triplets is not None:
        if not Path(f.triplets).is_file():
            raise KeepStamp(f"the --triplets file {f.triplets} is not found", fix="check the path")
        out["triplets"] = file_sha256(Path(f.triplets))
    return out


def _finetune_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    own = ("val.parquet",) if config.finetune.triplets else ("train.parquet", "val.parquet")
    out = {"prepare": ("*",), "triplets": own}
    if _cleaned(config):
        out["clean"] = ("*",)
    return out


def _pin_finetune(config: PipelineConfig) -> PipelineConfig:
    f = config.finetune
    if f.model is None:
        return config
    return config.model_copy(
        update={"finetune": f.model_copy(update={"model": _canon(f.model, config.embed.cache_dir)})}
    )


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
    splits, labels = _prepared(config)
    classes = labels["label"].astype(str).tolist()
    own = config.run_dir / "triplets"
    triplets = load_triplets(
        Path(f.triplets) if f.triplets else own / "train.parquet", classes=classes, limit=f.max_triplets, seed=f.seed
    )
    val = load_triplets(own / "val.parquet", classes=triplets.classes) if (own / "val.parquet").is_file() else None
    model_ref = _finetune_base(config)
    resolved = encoders.resolve(model_ref, cache_dir=config.embed.cache_dir)
    text_prompt, label_prompt = encoders.resolve_prompts(
        resolved.ref, config.embed.text_prompt, config.embed.label_prompt
    )
    checkpoints = ctx.keep_dir("checkpoints") / ctx.key
    info = finetune(
        triplets=triplets,
        val_triplets=val,
        centroid_data=centroid_data(config, splits),
        config=f.model_copy(update={"cache_dir": f.cache_dir or config.embed.cache_dir}),
        model_ref=model_ref,
        text_prompt=text_prompt,
        label_prompt=label_prompt,
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
        "triplets": info["triplets"]["rows"],
        "judge": info["triplets"]["judge"],
    }


def _drop_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def _finetune_on_cpu(config: PipelineConfig) -> bool:
    return encoders.pick_device(config.finetune.device) == "cpu"


def finetuned_model(config: PipelineConfig) -> str:
    """The fine-tuned encoder's folder (a local model reference)."""
    return str(config.run_dir / "finetune" / "model")


def finetuned_vectors(config: PipelineConfig, splits, labels) -> embed.RunVectors:
    """The fine-tuned encoder's vectors of every split (``embed-finetuned``'s folder)."""
    return embed.load_vectors(
        config.run_dir / "embed-finetuned",
        model=finetuned_model(config),
        config=config.embed,
        splits=splits,
        labels=labels,
        text_column=config.text_column,
    )


def _finetuned_identity(config: PipelineConfig) -> dict[str, str]:
    """The fine-tuned model's content fingerprint: new weights under the same settings are a new encoder."""
    model = Path(finetuned_model(config))
    return {"model": encoders.model_fingerprint(str(model)) if model.is_dir() else "missing"}


def _embed_finetuned_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    out = {"prepare": ("*",), "finetune": ("model/*",)}
    if _cleaned(config):
        out["clean"] = ("*",)
    return out


def _run_embed_finetuned(ctx: StageContext) -> dict[str, Any]:
    """Encode every split and the category texts with the fine-tuned encoder (its own folder of vectors)."""
    config = ctx.config
    return _embed_into(ctx, config.embed.model_copy(update={"model": finetuned_model(config), "extra_models": []}))


# ------------------------------------------------------------------------------------------- report


def refuse_leaky_encoders(config: PipelineConfig, splits) -> None:
    """A fine-tuned folder used as an ordinary encoder (``embed.model`` or ``embed.extra_models``) learned the labels
    of the ads in its triplets (their ids are in its ``jobembed-ads-seen.json``): cross-validating or testing it on
    those ads would score it on what it was taught. Raises DataError when it holds any of this run's ads."""
    dev = set(splits["train"]["id"].astype(str)) | set(splits["val"]["id"].astype(str))
    test = set(splits["test"]["id"].astype(str))
    for ref in config.embed.models():
        sidecar = Path(ref).expanduser() / encoders.SEEN_SIDECAR
        if not sidecar.is_file():
            continue
        seen = {str(i) for i in read_json(sidecar)}
        if seen & (dev | test):
            raise DataError(
                f"the encoder {ref} was fine-tuned on triplets holding {len(seen & dev)} train/val and "
                f"{len(seen & test)} test ads of this run: cross-validation and the test split would score it on "
                "labels it learned",
                fix="drop it from embed.extra_models (the run's config.yaml keeps what earlier commands set: pass "
                "-c a file with `extra_models: []`), and compare a fine-tune through `jobembed finetune RUN` "
                "(report then scores it on the test split only)",
            )


def _report_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {
        "prepare": ("*",),
        "embed": tuple(p for ref in config.embed.models() for p in _encoder_part(config, ref)),
        "embed-finetuned": ("*",),
        "finetune": ("ads_seen.json",),
    }
    if _cleaned(config):
        out["clean"] = ("*",)
    return out


def _run_compare_report(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    splits, labels = _prepared(config)
    refuse_leaky_encoders(config, splits)
    vectors = {m: _vectors(config, m, splits, labels) for m in config.embed.models()}
    evaluation = evaluate_systems(config=config, splits=splits, labels=labels, vectors=vectors, progress=ctx.progress)
    evaluation.metrics["data"]["cleaning"] = _cleaning_summary(config)
    if config.finetune.enabled:
        evaluation.metrics["finetuned"] = _evaluate_finetuned(config, splits, labels, evaluation, ctx.progress)
    write_report(evaluation, out_dir=ctx.out, config=config, labels=labels)
    return {"winner": evaluation.metrics["winner"], "bundled": evaluation.metrics["bundled"]}


def _evaluate_finetuned(config: PipelineConfig, splits, labels, evaluation, progress: bool) -> dict[str, Any]:
    tuned = finetuned_vectors(config, splits, labels)
    info = read_json(config.run_dir / "finetune" / "finetune.json")
    # Compared with the same system on the encoder it was fine-tuned from (else on embed.model).
    refs = {r.get("encoder") for r in evaluation.metrics["systems"].values()}
    base = info["base_model"]
    if base not in refs:
        base = encoders.resolve(config.embed.model, cache_dir=config.embed.cache_dir, build=False).ref
    frozen_key_of = {
        r["system"]: key
        for key, r in evaluation.metrics["systems"].items()
        if r.get("encoder") == base and r["system"] != "tfidf"
    }
    source = info["triplets"] | {
        "model": finetuned_model(config),
        "base_model": info["base_model"],
        "loss": info["loss"],
        "positive": str(config.triplets.positive),
    }
    return evaluate_finetuned(
        config=config,
        splits=splits,
        labels=labels,
        tuned=tuned,
        frozen_key_of=frozen_key_of,
        frozen_preds=evaluation.test_predictions,
        source=source,
        ads_seen=set(read_json(config.run_dir / "finetune" / "ads_seen.json")),
        fitted=evaluation.models,
        progress=progress,
    )


def _cleaning_summary(config: PipelineConfig) -> dict[str, Any]:
    """For the report: which text the systems read and, if cleaned, by what."""
    out: dict[str, Any] = {"text_column": str(config.text_column)}
    report = config.run_dir / "clean" / "report.json"
    if _cleaned(config) and report.is_file():
        r = read_json(report)
        out |= {"cleaner": r["cleaner"], "sources": r["sources"], "mean_chars": r["mean_chars"]}
    return out


# ------------------------------------------------------------------------------------------- bundle


def _bundle_consume(config: PipelineConfig) -> dict[str, tuple[str, ...]]:
    finetuned = config.bundle.encoder == BundleEncoderChoice.finetuned
    out = {"prepare": ("labels.json",), "report": (f"{WINNER_FINETUNED_DIR if finetuned else WINNER_DIR}/*",)}
    if finetuned:
        out["finetune"] = ("model/*",)  # copied into the bundle
    return out


def _run_bundle(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    finetuned = config.bundle.encoder == BundleEncoderChoice.finetuned
    winner_dir = config.run_dir / "report" / (WINNER_FINETUNED_DIR if finetuned else WINNER_DIR)
    if finetuned and not config.finetune.enabled:
        raise DataError(
            "bundle.encoder is finetuned but finetune is off in this run (finetune.enabled: false), so the report "
            "holds no fine-tuned encoder",
            fix="run `jobembed finetune RUN` (it turns the stage on; a model already made under the same settings is "
            "kept and re-used) and report, or bundle the frozen encoder (--encoder frozen)",
        )
    if not (winner_dir / "winner.json").is_file():
        raise DataError(
            f"report found no system a bundle can serve ({', '.join(map(str, config.report.systems))})",
            fix="add mlp, centroid or zeroshot to report.systems (--systems) and re-run report",
        )
    winner = read_json(winner_dir / "winner.json")
    head = load_head(winner_dir / "head", winner["head_kind"])
    labels = data.load_labels(config.run_dir / "prepare")
    encoder = EncoderInfo(
        model=winner["encoder"],
        fingerprint=winner["encoder_fingerprint"],
        precision=winner["encoder_precision"],
        text_prompt=winner["encoder_text_prompt"],
        max_seq_length=config.embed.max_seq_length,
    )
    path = save_bundle(
        ctx.out,
        model=head,
        system=winner["system"],
        encoder=encoder,
        config=config,
        labels=labels,
        metrics={**winner["metrics"], "selective": winner.get("selective")},
        # the fine-tuned folder lives in the run and changes with its next fine-tune: the bundle keeps its own copy
        copy_encoder=config.bundle.copy_encoder or finetuned,
    )
    return {"bundle": str(path), "system": winner["key"]}


# ------------------------------------------------------------------------------------------- the graph


def _finetune_on(config: PipelineConfig) -> bool:
    return bool(config.finetune.enabled)


def _finetune_off(config: PipelineConfig) -> str:
    return "finetune.enabled is false; `jobembed finetune RUN` turns it on"


def _uses_models(config: PipelineConfig) -> bool:
    return True


register_pin(_pin_embed)
register_pin(_pin_clean)
register_pin(_pin_finetune)

register(
    Stage(
        "prepare",
        section="prepare",
        run=_run_prepare,
        identity=_prepare_identity,
        products=("*.parquet", "labels.json"),
        help="read, validate, dedupe, group reposts, split",
    )
)
register(
    Stage(
        "clean",
        section="clean",
        inputs=("prepare",),
        run=_run_clean,
        identity=_clean_identity,
        products=("*.parquet",),
        names_models=lambda config: config.clean.backend == CleanBackend.gliner2,
        help="rewrite each ad as occupation, skills and tasks (gliner2), or strip its noise (rules)",
    )
)
register(
    Stage(
        "embed",
        section="embed",
        reads=("text_column",),
        inputs=("prepare", "clean"),
        consumes=lambda config: {"prepare": ("*",), **({"clean": ("*",)} if _cleaned(config) else {})},
        run=_run_embed,
        identity=_embed_identity,
        products=("*/*.npy", "*/embeddings.json"),
        names_models=_uses_models,
        help="encode every split and the category texts with every encoder (cached)",
        # 2: embeddings.json no longer carries how many texts came from the cache (it changed with every re-run).
        version=2,
    )
)
register(
    Stage(
        "head",
        section="head",
        formerly=("train-head",),
        reads=("classify", "clean", "embed", "text_column", "report.min_support"),
        ignores=("embed.extra_models",),
        inputs=("prepare", "embed"),
        consumes=lambda config: {"prepare": ("*",), "embed": _encoder_part(config, config.embed.model)},
        run=_run_train_head,
        identity=_head_identity,
        names_models=_uses_models,
        help="MLP head on embed.model's vectors, early stopping on validation; a bundle in head/",
    )
)
register(
    Stage(
        "triplets",
        section="triplets",
        formerly=("make-triplets",),
        reads=("text_column", "clean.backend"),
        inputs=("prepare", "clean", "embed"),
        consumes=_triplets_consume,
        run=_run_make_triplets,
        identity=_triplets_identity,
        products=("train.parquet", "val.parquet"),
        names_models=_uses_models,
        summarise=True,
        help="mine anchor/positive/negative triplets in train (and val) and judge them: llm, model or none",
        # 2: the margin rule measures a candidate against the anchor's nearest same-class ad, not against its own
        # positive (random positives kept 73 of 576 triplets under the old rule), so older runs keep other triplets.
        # 3: a reused anchor's bar is its nearest ad (was its n-th), random positives draw from their own generator
        # (anchors no longer move with the positive strategy), and the model judge's folds keep reposts together.
        version=3,
    )
)
register(
    Stage(
        "finetune",
        section="finetune",
        reads=("text_column",),
        inputs=("prepare", "clean", "triplets"),
        consumes=_finetune_consume,
        run=_run_finetune,
        identity=_finetune_identity,
        products=("model/*", "ads_seen.json"),
        enabled=_finetune_on,
        off_reason=_finetune_off,
        keep=("checkpoints",),
        all_ranks=True,
        on_cpu=_finetune_on_cpu,
        names_models=_uses_models,
        summarise=True,
        help="fine-tune the encoder on the kept triplets (SentenceTransformerTrainer); best val checkpoint kept",
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
        names_models=_uses_models,
        help="encode every split with the fine-tuned encoder (when finetune.enabled)",
    )
)
register(
    Stage(
        "report",
        section="report",
        formerly=("compare-report",),
        reads=("head", "text_column", "prepare.seed", "embed.model", "embed.extra_models", "triplets.positive"),
        inputs=("prepare", "clean", "embed", "finetune", "embed-finetuned"),
        consumes=_report_consume,
        run=_run_compare_report,
        products=(f"{WINNER_DIR}/*", f"{WINNER_FINETUNED_DIR}/*"),
        names_models=_uses_models,
        help="every system on the same splits: test, k-fold CV, intervals, significance",
        # 2: abstention thresholds on out-of-fold answers (were validation's), stored for the bundle; the stack's
        # out-of-fold features grouped by repost; winner.json carries its encoder's precision and prompt.
        version=2,
    )
)
register(
    Stage(
        "bundle",
        section="bundle",
        reads=("classify", "clean", "embed", "text_column", "finetune.enabled"),
        ignores=("embed.extra_models",),
        inputs=("prepare", "report", "finetune"),
        consumes=_bundle_consume,
        run=_run_bundle,
        names_models=_uses_models,
        help="the report's best servable system as a deployable bundle",
        version=2,  # 2: jobembed-bundle/3, bundle.json covered by its own digest
    )
)


# ------------------------------------------------------------------------------------------- configs


def config_for_run(
    run_dir: Path, config_path: Path | None, overrides: dict[str, Any], *, flags: dict[str, str] | None = None
) -> PipelineConfig:
    """The config of a run: its own config.yaml, with ``config_path`` layered on top (its fields win), and CLI
    overrides on top of both.

    A run folder whose stages ran but whose config.yaml is gone cannot be continued from defaults (they would name
    other models and files): that is one line naming the missing file.
    """
    run_dir = Path(run_dir)
    own = run_dir / "config.yaml"
    overrides = {"name": run_dir.name, "runs_dir": str(run_dir.parent), **overrides}
    made = any((run_dir / s.dir_name / "stage.json").is_file() for s in STAGES.values())
    if not own.is_file() and made and config_path is None:
        raise ConfigError(
            f"{own} is missing: the run's settings are gone, and defaults would name other models and files",
            fix="restore that file, or pass the run's settings with -c FILE",
        )
    bases = [p for p in (own if own.is_file() else None, config_path) if p is not None]
    return load_config(bases, overrides, flags=flags)
