"""The stage graph: every stage declared once, and the one runner that ``run``, the stamps and the CLI use.

A ``Stage`` names its config sections, the stages whose outputs it reads, the one folder of the run it
writes, and what else its result depends on (input files, model fingerprints). Its key hashes all of
that plus its inputs' keys and its code version, so a change anywhere upstream (a config field, an edited input
file, an encoder folder rebuilt in place with other weights, a jobembed release that changes what a stage writes)
changes every key downstream. ``run_stages`` runs a target stage and whatever it needs that is not current, and
skips the rest. Adding a stage is one module for its work, one ``register(Stage(...))`` below, and one config
section.

The graph today::

    prepare ──▶ clean ──▶ embed ──▶ train-head
                             ├────▶ make-triplets ──▶ finetune ──▶ embed-finetuned ──┐
                             └──────────────────────────────────────────────────────┴─▶ compare-report ──▶ bundle

``finetune`` and ``embed-finetuned`` do nothing unless ``finetune.enabled`` (``jobembed finetune RUN`` turns it on).

Run folder (``runs/<name>/``), each stage writing only under its own folder::

    config.yaml        the resolved pipeline config; later commands on the run start from it
    manifest.json      per stage: resolved config, input keys, code version, package versions, git commit
    prepare/           {train,val,test}.parquet, labels.json, data_card.json, config.yaml, stage.json
    clean/             {train,val,test}.parquet (id, clean_text, clean_source, spans), report.md/json, config.yaml
    embed/             <encoder>-<fingerprint>/{train,val,test,labels}.npy + embeddings.json; stage.json
    triplets/          {train,val}.parquet (kept), candidates/, noise.csv, report.md/json (make-triplets)
    finetune/          model/ (with its model card), finetune.json, log.jsonl, ads_seen.json (finetune)
    embed-finetuned/   the fine-tuned encoder's vectors, laid out like embed/
    head/              bundle of the MLP head on embed.model (train-head); stage.json
    report/            report.md, metrics.json, per_class/, figures/, winner/ (compare-report); stage.json
    bundle/            the deployable bundle of the report's winner (bundle); stage.json
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobembed import data, distributed, embed, encoders, metrics
from jobembed.artifacts import file_sha256, hash_obj, mark_stage_done, read_json, read_stamp, write_manifest
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
    section_for_key,
    write_resolved,
)
from jobembed.errors import ConfigError, DataError
from jobembed.evaluate import evaluate_finetuned, evaluate_systems
from jobembed.finetune import finetune, load_triplets
from jobembed.head import MLPHead
from jobembed.report import WINNER_DIR, WINNER_FINETUNED_DIR, write_report
from jobembed.store import open_store
from jobembed.triplets import core as triplets_core
from jobembed.triplets.core import TripletInputs, make_triplets


class _KeepStamp(Exception):
    """Raised by an identity function that cannot look at its inputs now (e.g. the input file moved): the
    stage's stamp, if any, stands in; without one the stage cannot run and the message says why."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    Attributes:
        name: the command name (``jobembed <name> RUN``) and the manifest/stamp name.
        folder: the only folder of the run the stage writes (its ``stage.json`` stamp goes there too).
        sections: config sections it reads; their fields (minus runtime-only ones) are in its key.
        inputs: stages whose outputs it reads; their keys are in its key.
        run: ``(config, progress) -> summary``; does the work and writes ``folder``.
        identity: what else the result depends on (input file hashes, model fingerprints), JSON-able.
        shared: pipeline-level fields it reads (``text_column``).
        help: one line for ``--help`` and the README.
        version: the stage's code version, in its key. Bump it (and say why next to it) when a change to the
            stage's code changes what it writes for the same config and inputs: runs made by the older code then
            re-run that stage and every stage after it, instead of keeping an output the new code would not make.
            Not bumped for speed-ups, messages or refactors that write the same thing.
    """

    name: str
    folder: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    run: Callable[[PipelineConfig, bool], dict[str, Any]]
    identity: Callable[[PipelineConfig], Any] = lambda config: None
    shared: tuple[str, ...] = ()
    help: str = ""
    version: int = 1


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the graph; its inputs must already be registered (registration order is run order)."""
    missing = [i for i in stage.inputs if i not in STAGES]
    assert not missing and stage.name not in STAGES, (stage.name, missing)
    STAGES[stage.name] = stage
    return stage


def inputs_of(name: str, config: PipelineConfig) -> tuple[str, ...]:
    """The stages ``name`` reads from under ``config``: a disabled fine-tune reads nothing, so triplets that
    change (or were never made) leave it, and the compare-report after it, current."""
    if name == "finetune" and not config.finetune.enabled:
        return ()
    return STAGES[name].inputs


def ancestors(name: str, config: PipelineConfig) -> list[str]:
    """``name`` and every stage it needs under ``config``, in run order."""
    needed: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(inputs_of(current, config))
    return [s for s in STAGES if s in needed]


# ------------------------------------------------------------------------------------------- keys


class Plan:
    """Stage keys for one config: ``hash(stage, code version, its sections, shared fields, identity, input keys)``."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self._keys: dict[str, str] = {}
        self.identities: dict[str, Any] = {}

    def key(self, name: str) -> str:
        if name not in self._keys:
            stage = STAGES[name]
            try:
                identity = stage.identity(self.config)
            except _KeepStamp as reason:
                stamp = read_stamp(self.config.run_dir / stage.folder)
                if stamp is None or "identity" not in stamp:
                    raise DataError(str(reason), fix=reason.fix) from None
                identity = stamp["identity"]
            self.identities[name] = identity
            payload = {
                "stage": name,
                "version": stage.version,
                "sections": {s: section_for_key(getattr(self.config, s)) for s in stage.sections},
                "shared": {f: getattr(self.config, f) for f in stage.shared},
                "identity": identity,
                "inputs": {i: self.key(i) for i in inputs_of(name, self.config)},
            }
            self._keys[name] = hash_obj(payload)
        return self._keys[name]


def _prepare_identity(config: PipelineConfig) -> dict[str, str]:
    p = config.prepare
    if p.input is None:
        raise _KeepStamp(
            f"{config.run_dir} has no prepared splits, and no input file is set (prepare.input)",
            fix=f"run `jobembed prepare {config.run_dir} --input ADS.csv` first",
        )
    if not Path(p.input).is_file():
        raise _KeepStamp(
            f"the --input file {p.input} (prepare.input) is not found",
            fix=f"check the path (relative paths start at {Path.cwd()})",
        )
    out = {"input": file_sha256(Path(p.input))}
    if p.labels is not None and Path(p.labels.path).is_file():
        out["labels"] = file_sha256(Path(p.labels.path))
    return out


def _embed_identity(config: PipelineConfig) -> dict[str, str]:
    """The content fingerprint of every encoder: a folder rebuilt in place with other weights is a new model."""
    return {ref: encoders.model_fingerprint(ref, cache_dir=config.embed.cache_dir) for ref in config.embed.models()}


def _clean_identity(config: PipelineConfig) -> dict[str, object]:
    """The cleaner's backend, pattern files and (gliner2) model fingerprint, schema and windowing version.

    The windowing version is here rather than in the stage's code version so that only gliner2 runs re-clean
    when windows change (rules runs, and everything downstream of them, keep their keys).
    """
    info = Cleaner(config.clean).info()
    if info["backend"] == str(CleanBackend.gliner2):
        info["windows_version"] = WINDOWS_VERSION
    return info


def _triplets_identity(config: PipelineConfig) -> dict[str, str]:
    """The frozen encoder that mined the candidates, and the judge's prompt templates (edited prompts re-judge)."""
    prompts = sorted((Path(triplets_core.__file__).parent / "prompts").glob("*.txt"))
    return _head_identity(config) | {p.name: file_sha256(p) for p in prompts}


def _head_identity(config: PipelineConfig) -> dict[str, str]:
    return {"model": encoders.model_fingerprint(config.embed.model, cache_dir=config.embed.cache_dir)}


# ------------------------------------------------------------------------------------------- runners


def _prepared(config: PipelineConfig):
    """Prepare's splits and labels; with ``text_column: clean_text`` each split gains the clean stage's column."""
    prepare_dir = config.run_dir / "prepare"
    splits = data.load_splits(prepare_dir)
    if config.text_column == TextColumn.clean_text:
        for name, frame in splits.items():
            frame["clean_text"] = load_clean_column(config.run_dir / "clean", name, frame["id"]).to_numpy()
    return splits, data.load_labels(prepare_dir)


def _run_clean(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    splits = data.load_splits(config.run_dir / "prepare")
    out_dir = config.run_dir / "clean"
    report = clean_splits(splits=splits, config=config.clean, out_dir=out_dir, progress=progress)
    write_resolved(config.clean, out_dir)
    return {k: report[k] for k in ("sources", "fallbacks", "empty_outputs", "mean_chars", "seconds")} | {
        "pii_rows": report["pii_check"]["rows_with_pii"]
    }


def _run_prepare(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    if config.prepare.input is None:
        raise ConfigError(
            "prepare needs an input file", fix="pass --input (CSV, JSONL or Parquet) or set prepare.input"
        )
    result = data.prepare(config=config.prepare, out_dir=config.run_dir / "prepare", progress=progress)
    return {"card": result.card}


def _run_embed(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    splits, labels = _prepared(config)
    out_dir = config.run_dir / "embed"
    folders = embed.embed_splits(
        splits=splits,
        labels=labels,
        out_dir=out_dir,
        config=config.embed,
        text_column=config.text_column,
        progress=progress,
    )
    keep = {f.name for f in folders.values()}
    for stale in out_dir.iterdir():  # encoders no longer in the run
        if stale.is_dir() and stale.name not in keep:
            shutil.rmtree(stale, ignore_errors=True)
    write_resolved(config.embed, out_dir)
    return {"folders": {k: str(v) for k, v in folders.items()}}


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


def _run_train_head(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    """Fit the MLP head on train (early stopping on val), report validation metrics, save a bundle in ``head/``.

    The test split is not read here: it is scored once, by compare-report.
    """
    splits, labels = _prepared(config)
    vectors = _vectors(config, config.embed.model, splits, labels)
    y = {name: frame["label"].to_numpy(dtype=str) for name, frame in splits.items()}
    has_val = len(splits["val"]) > 0
    head = MLPHead.from_config(config.head).set_params(verbose=1 if progress else 0)
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
        config.run_dir / "head",
        model=head,
        system="mlp",
        encoder=_encoder_info(config, vectors),
        config=config,
        labels=labels,
        metrics={"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_},
    )
    return {"val": val, "best_epoch": int(head.best_epoch_), "temperature": head.temperature_}


def triplet_inputs(config: PipelineConfig) -> TripletInputs:
    """What make-triplets reads: train/val frames, their texts (the run's and the judge's), frozen vectors."""
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


# Stages whose summary goes into manifest.json (make-triplets: calls, tokens and what they cost).
_SUMMARISED = {"make-triplets", "finetune"}


def _run_make_triplets(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    out_dir = config.run_dir / "triplets"
    report = make_triplets(
        inputs=triplet_inputs(config),
        config=config.triplets,
        out_dir=out_dir,
        store=open_store(config.embed.cache_dir or default_cache_dir()),
        progress=progress,
    )
    write_resolved(config.triplets, out_dir)
    out = {"judge": report["judge"], "kept": report["kept"], "noise": report["noise"]["ads"]}
    if "llm" in report:
        keys = ("calls", "cached", "answered", "unparsable", "failed", "prompt_tokens", "completion_tokens", "cost")
        out["llm"] = {k: report["llm"][k] for k in keys} | {"model": report["llm"]["model"]}
    return out


def _finetune_identity(config: PipelineConfig) -> dict[str, str]:
    """The base encoder's content, and an outside triplet file's (the run's own triplets are an input stage)."""
    f = config.finetune
    if not f.enabled:
        return {"enabled": False}
    out = {"base": encoders.model_fingerprint(f.model or config.embed.model, cache_dir=config.embed.cache_dir)}
    if f.triplets is not None:
        if not Path(f.triplets).is_file():
            raise _KeepStamp(f"the --triplets file {f.triplets} is not found", fix="check the path")
        out["triplets"] = file_sha256(Path(f.triplets))
    return out


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


def _run_finetune(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    """Fine-tune the encoder on the run's kept triplets (or finetune.triplets); evaluate on the val split."""
    f = config.finetune
    out_dir = config.run_dir / "finetune"
    if not f.enabled:
        for stale in ("model", "finetune.json", "ads_seen.json", "log.jsonl") if distributed.is_main() else ():
            target = out_dir / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return {"enabled": False}
    splits, labels = _prepared(config)
    classes = labels["label"].astype(str).tolist()
    own = config.run_dir / "triplets"
    triplets = load_triplets(
        Path(f.triplets) if f.triplets else own / "train.parquet", classes=classes, limit=f.max_triplets, seed=f.seed
    )
    val = load_triplets(own / "val.parquet", classes=triplets.classes) if (own / "val.parquet").is_file() else None
    model_ref = f.model or config.embed.model
    resolved = encoders.resolve(model_ref, cache_dir=config.embed.cache_dir)
    text_prompt, label_prompt = encoders.resolve_prompts(
        resolved.ref, config.embed.text_prompt, config.embed.label_prompt
    )
    info = finetune(
        triplets=triplets,
        val_triplets=val,
        centroid_data=centroid_data(config, splits),
        config=f.model_copy(update={"cache_dir": f.cache_dir or config.embed.cache_dir}),
        model_ref=model_ref,
        text_prompt=text_prompt,
        label_prompt=label_prompt,
        out_dir=out_dir,
        progress=progress,
    )
    if distributed.is_main():
        write_resolved(f, out_dir)
    return {k: info[k] for k in ("base_model", "fingerprint", "loss", "steps", "seconds", "val")} | {
        "triplets": info["triplets"]["rows"],
        "judge": info["triplets"]["judge"],
    }


# Stages every process of a distributed launch runs (the rest run on rank 0 alone).
ALL_RANKS = frozenset({"finetune"})


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


def _run_embed_finetuned(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    """Encode every split and the category texts with the fine-tuned encoder (its own folder of vectors)."""
    out_dir = config.run_dir / "embed-finetuned"
    if not config.finetune.enabled:
        shutil.rmtree(out_dir, ignore_errors=True)
        return {"enabled": False}
    splits, labels = _prepared(config)
    tuned = config.embed.model_copy(update={"model": finetuned_model(config), "extra_models": []})
    folders = embed.embed_splits(
        splits=splits, labels=labels, out_dir=out_dir, config=tuned, text_column=config.text_column, progress=progress
    )
    keep = {f.name for f in folders.values()}
    for stale in out_dir.iterdir():  # an earlier fine-tune's vectors
        if stale.is_dir() and stale.name not in keep:
            shutil.rmtree(stale, ignore_errors=True)
    return {"folders": {k: str(v) for k, v in folders.items()}}


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
                fix="compare a fine-tune through `jobembed finetune RUN` (compare-report then scores it on the test "
                "split only), or use the folder on data whose ads it never saw",
            )


def _run_compare_report(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    splits, labels = _prepared(config)
    refuse_leaky_encoders(config, splits)
    vectors = {m: _vectors(config, m, splits, labels) for m in config.embed.models()}
    evaluation = evaluate_systems(config=config, splits=splits, labels=labels, vectors=vectors, progress=progress)
    evaluation.metrics["data"]["cleaning"] = _cleaning_summary(config)
    if config.finetune.enabled:
        evaluation.metrics["finetuned"] = _evaluate_finetuned(config, splits, labels, evaluation, progress)
    write_report(evaluation, out_dir=config.run_dir / "report", config=config, labels=labels)
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
    if config.text_column == TextColumn.clean_text and report.is_file():
        r = read_json(report)
        out |= {"cleaner": r["cleaner"], "sources": r["sources"], "mean_chars": r["mean_chars"]}
    return out


def _run_bundle(config: PipelineConfig, progress: bool) -> dict[str, Any]:
    finetuned = config.bundle.encoder == BundleEncoderChoice.finetuned
    winner_dir = config.run_dir / "report" / (WINNER_FINETUNED_DIR if finetuned else WINNER_DIR)
    if finetuned and not config.finetune.enabled:
        raise DataError(
            "bundle.encoder is finetuned but this run has no fine-tuned encoder",
            fix="run `jobembed finetune RUN` and compare-report first, or bundle the frozen encoder (--encoder frozen)",
        )
    if not (winner_dir / "winner.json").is_file():
        raise DataError(
            f"compare-report found no system a bundle can serve ({', '.join(map(str, config.report.systems))})",
            fix="add mlp, centroid or zeroshot to report.systems (--systems) and re-run compare-report",
        )
    winner = read_json(winner_dir / "winner.json")
    head_dir = winner_dir / "head"
    head = load_head(head_dir, winner["head_kind"])
    splits, labels = _prepared(config)
    if finetuned:
        vectors = finetuned_vectors(config, splits, labels)
    else:
        vectors = _vectors(config, winner["encoder"], splits, labels)
    if vectors.fingerprint != winner["encoder_fingerprint"]:  # pragma: no cover - keys make this unreachable
        raise DataError("the report's winner was made with other vectors", fix="re-run compare-report")
    path = save_bundle(
        config.run_dir / "bundle",
        model=head,
        system=winner["system"],
        encoder=_encoder_info(config, vectors),
        config=config,
        labels=labels,
        metrics={**winner["metrics"], "selective": winner.get("selective")},
        # the fine-tuned folder lives in the run and changes with its next fine-tune: the bundle keeps its own copy
        copy_encoder=config.bundle.copy_encoder or finetuned,
    )
    return {"bundle": str(path), "system": winner["key"]}


register(
    Stage(
        "prepare",
        folder="prepare",
        sections=("prepare",),
        inputs=(),
        run=_run_prepare,
        identity=_prepare_identity,
        help="read, validate, dedupe, group reposts, split",
    )
)
register(
    Stage(
        "clean",
        folder="clean",
        sections=("clean",),
        inputs=("prepare",),
        run=_run_clean,
        identity=_clean_identity,
        help="rewrite each ad as occupation, skills and tasks (gliner2), or strip its noise (rules)",
    )
)
register(
    Stage(
        "embed",
        folder="embed",
        sections=("embed",),
        inputs=("prepare", "clean"),
        run=_run_embed,
        identity=_embed_identity,
        shared=("text_column",),
        help="encode every split and the category texts with every encoder (cached)",
    )
)
register(
    Stage(
        "train-head",
        folder="head",
        sections=("head", "classify"),
        inputs=("embed",),
        run=_run_train_head,
        identity=_head_identity,
        help="MLP head on embed.model's vectors, early stopping on validation; a bundle in head/",
    )
)
register(
    Stage(
        "make-triplets",
        folder="triplets",
        sections=("triplets",),
        inputs=("prepare", "clean", "embed"),
        run=_run_make_triplets,
        identity=_triplets_identity,
        shared=("text_column",),
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
        folder="finetune",
        sections=("finetune", "embed"),
        inputs=("prepare", "clean", "make-triplets"),
        run=_run_finetune,
        identity=_finetune_identity,
        shared=("text_column",),
        help="fine-tune the encoder on the kept triplets (SentenceTransformerTrainer); best val checkpoint kept",
    )
)
register(
    Stage(
        "embed-finetuned",
        folder="embed-finetuned",
        sections=("embed",),
        inputs=("prepare", "clean", "finetune"),
        run=_run_embed_finetuned,
        shared=("text_column",),
        help="encode every split with the fine-tuned encoder (when finetune.enabled)",
    )
)
register(
    Stage(
        "compare-report",
        folder="report",
        sections=("report", "head"),
        inputs=("prepare", "clean", "embed", "embed-finetuned"),
        run=_run_compare_report,
        shared=("text_column",),
        help="every system on the same splits: test, k-fold CV, intervals, significance",
        # 2: abstention thresholds on out-of-fold answers (were validation's), stored for the bundle; the stack's
        # out-of-fold features grouped by repost.
        version=2,
    )
)
register(
    Stage(
        "bundle",
        folder="bundle",
        sections=("bundle", "classify"),
        inputs=("compare-report",),
        run=_run_bundle,
        help="the report's best servable system as a deployable bundle",
    )
)


# ------------------------------------------------------------------------------------------- running


def pin_models(config: PipelineConfig) -> PipelineConfig:
    """The config with canonical model references: builtins in lower case, Hub ids pinned to a commit.

    Done once, before anything is encoded, and written to the run's config.yaml, so every later stage (and
    the bundle) uses the same weights even if the Hub's ``main`` moves on.
    """
    e = config.embed

    def canon(ref: str) -> str:
        resolved = encoders.resolve(ref, cache_dir=e.cache_dir, build=False)
        return ref if resolved.kind == "local" else resolved.ref

    pinned = e.model_copy(update={"model": canon(e.model), "extra_models": [canon(r) for r in e.extra_models]})
    update: dict[str, Any] = {"embed": pinned}
    if config.clean.backend == CleanBackend.gliner2:
        update["clean"] = config.clean.model_copy(update={"model": canon(config.clean.model)})
    return config.model_copy(update=update)


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
        probe = run_dir / ".jobembed-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write into the run folder {run_dir} ({e.strerror or e})",
            fix="pass a folder you can write to",
        ) from None


def config_for_run(
    run_dir: Path, config_path: Path | None, overrides: dict[str, Any], *, flags: dict[str, str] | None = None
) -> PipelineConfig:
    """The config of an existing run (its config.yaml), or ``config_path``, with CLI overrides on top."""
    run_dir = Path(run_dir)
    own = run_dir / "config.yaml"
    base = config_path or (own if own.is_file() else None)
    overrides = {"name": run_dir.name, "runs_dir": str(run_dir.parent), **overrides}
    return load_config(base, overrides, flags=flags)


def run_stages(
    config: PipelineConfig,
    *,
    target: str | None = None,
    force: bool = False,
    progress: bool = True,
    on_stage: Callable[[str, str], None] | None = None,
) -> dict[str, str]:
    """Run ``target`` (default: every stage) and whatever it needs that is not current.

    A stage is current when its stamp holds its key and no stage it reads from ran in this call. The run's
    config.yaml is written after each stage that succeeds, so a bad flag never sticks to the run.

    Args:
        force: re-run ``target`` (every stage when ``target`` is None) even when current.
        on_stage: callback ``(stage, "run" | "skip")`` for the CLI to print progress.

    Returns:
        stage -> "ran" | "skipped", in run order.
    """
    created = not config.run_dir.exists()
    check_run_dir(config.run_dir)
    try:
        return _run(
            config,
            names=ancestors(target, config) if target else list(STAGES),
            target=target,
            force=force,
            progress=progress,
            on_stage=on_stage,
        )
    except BaseException:
        if created and config.run_dir.is_dir() and not any(config.run_dir.iterdir()):
            config.run_dir.rmdir()  # a command that failed before writing anything leaves no empty run folder
        raise


def _run(
    config: PipelineConfig,
    *,
    names: list[str],
    target: str | None,
    force: bool,
    progress: bool,
    on_stage: Callable[[str, str], None] | None,
) -> dict[str, str]:
    plan = Plan(config)
    status: dict[str, str] = {}
    main = distributed.is_main()
    many = distributed.world_size() > 1
    on_stage = on_stage if main else None
    for name in names:
        stage = STAGES[name]
        everywhere = name in ALL_RANKS
        if many and not everywhere and not main:
            continue  # rank 0 runs it; this rank waits at the fine-tune
        if many and everywhere:
            # The other ranks wait here for rank 0 to finish the stages before (and to build any model they load).
            distributed.wait_for_everyone(cpu=_finetune_on_cpu(config))
        if "embed" in stage.sections and plan.config is config:
            # Pinned when the first stage that uses a model comes up: prepare alone needs no model nor the Hub,
            # and an unprepared run says so before any model lookup.
            config = plan.config = pin_models(config)
        key = plan.key(name)
        stage_dir = config.run_dir / stage.folder
        stamp = read_stamp(stage_dir)
        upstream_ran = any(status.get(i) == "ran" for i in inputs_of(name, config))
        forced = force and (target is None or name == target)
        current = stamp is not None and stamp.get("key") == key and not upstream_ran and not forced
        if many and everywhere:
            current = distributed.from_main(current, cpu=_finetune_on_cpu(config))  # only rank 0 knows what ran
        if current:
            status[name] = "skipped"
            if on_stage:
                on_stage(name, "skip")
            continue
        if on_stage:
            on_stage(name, "run")
        summary = stage.run(config, progress)
        if not main:
            status[name] = "ran"
            continue
        mark_stage_done(stage_dir, key, identity=plan.identities.get(name), version=stage.version)
        write_manifest(
            config.run_dir,
            stage=name,
            config={s: getattr(config, s).model_dump(mode="json") for s in stage.sections},
            inputs={"identity": plan.identities.get(name), **{i: plan.key(i) for i in inputs_of(name, config)}},
            version=stage.version,
            summary=summary if name in _SUMMARISED else None,
        )
        write_resolved(config, config.run_dir)
        status[name] = "ran"
    return status
