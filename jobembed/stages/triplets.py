"""triplets: mine anchor/positive/negative triplets in train (and val) and judge them (``triplets/``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobembed.artifacts import file_sha256, read_json
from jobembed.clean.core import load_clean_column
from jobembed.cli.base import ConfigOpt, ForceOpt, ModelOpt, QuietOpt, RunArg, console, friendly, overrides, print_stage
from jobembed.config import default_cache_dir, register_section, write_resolved
from jobembed.embed import RunVectors
from jobembed.engine import Patterns, Stage, StageContext, config_for_run, pin_models, register, run_stages
from jobembed.errors import DataError, JobembedError
from jobembed.sections import CleanBackend, JudgeKind, JudgeMode, NoiseFilter, PositiveStrategy, TripletsConfig
from jobembed.stages._common import encoder_part, frozen_identity, names_models, prepared, reads_clean_text, run_vectors
from jobembed.store import open_store
from jobembed.triplets import core as triplets_core
from jobembed.triplets.core import TripletInputs, make_triplets

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from jobembed.config import PipelineConfig


register_section("triplets", TripletsConfig)


def judged_splits(config: PipelineConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Prepare's splits and labels with the run's text column; train and val also get ``clean_text`` whenever a
    cleaner ran (the judge reads the cleaned text even when the systems read the raw one)."""
    splits, labels = prepared(config)
    if config.clean.backend != CleanBackend.none:
        for name in ("train", "val"):  # the judge never reads the test split
            frame = splits[name]
            if "clean_text" not in frame:
                frame["clean_text"] = load_clean_column(config.run_dir / "clean", name, frame["id"]).to_numpy()
    return splits, labels


def inputs_for(
    config: PipelineConfig,
    *,
    frames: dict[str, pd.DataFrame],
    vectors: dict[str, np.ndarray],
    frozen: RunVectors,
    labels: pd.DataFrame,
) -> TripletInputs:
    """What mining and judging read, for any ``train``/``val`` frames (from ``judged_splits``) and their frozen
    vectors: the run's own splits, or a CV fold's inner slices."""
    judge = "clean_text" if config.clean.backend != CleanBackend.none else "text"
    return TripletInputs(
        frames=frames,
        texts={n: f[str(config.text_column)] for n, f in frames.items()},
        judge_texts={n: f[judge] for n, f in frames.items()},
        judge_reads=judge,
        labels=labels,
        vectors=vectors,
        label_vectors=frozen.labels,
        encoder=frozen.model,
        fingerprint=frozen.fingerprint,
        label_text=label_positive_text(config),
    )


def label_positive_text(config: PipelineConfig) -> str:
    """The text of a label positive: the category texts the run embeds (``embed.label_text``: in the ads' language
    with a taxonomy), a label's own taxonomy texts in place of ``taxonomy_mean`` (a mean of many texts, not a text)."""
    mode = str(config.embed.label_text)
    return "taxonomy" if mode == "taxonomy_mean" else mode


def label_positive_identity(config: PipelineConfig) -> dict[str, str]:
    """In a key only where it changes triplets (label positives, another text than name_description), so the runs
    made when label positives always read name_description keep theirs."""
    mode = label_positive_text(config)
    if PositiveStrategy(config.triplets.positive) is PositiveStrategy.label and mode != "name_description":
        return {"label_positive_text": mode}
    return {}


def triplet_inputs(config: PipelineConfig) -> TripletInputs:
    """What triplets reads: train/val frames, their texts (the run's and the judge's), frozen vectors."""
    splits, labels = judged_splits(config)
    frozen = run_vectors(config, config.embed.model, splits, labels)
    frames = {n: splits[n] for n in ("train", "val")}
    return inputs_for(
        config, frames=frames, vectors={"train": frozen.train, "val": frozen.val}, frozen=frozen, labels=labels
    )


def prompts_identity() -> dict[str, str]:
    """The judge's prompt templates by content: edited prompts re-judge."""
    prompts = sorted((Path(triplets_core.__file__).parent / "prompts").glob("*.txt"))
    return {p.name: file_sha256(p) for p in prompts}


def judge_probs_identity(config: PipelineConfig) -> dict[str, str]:
    """The content of ``triplets.judge_probs`` (a second round's judge reads it), where set: a new first round
    re-judges; moving the file does not."""
    path = config.triplets.judge_probs
    if path is None:
        return {}
    if not Path(path).is_file():
        raise DataError(
            f"triplets.judge_probs names {path}, which is not found",
            fix="name one of a first round's RUN/report/oof/*.parquet (`jobembed report` writes them)",
        )
    return {"judge_probs": file_sha256(Path(path))}


def _triplets_identity(config: PipelineConfig) -> dict[str, str]:
    """The frozen encoder that mined the candidates, the judge's prompt templates and its first-round
    probabilities."""
    return frozen_identity(config) | prompts_identity() | label_positive_identity(config) | judge_probs_identity(config)


def triplets_consume(config: PipelineConfig) -> dict[str, Patterns]:
    out: dict[str, Patterns] = {"prepare": ("*",), "embed": encoder_part(config, [config.embed.model])}
    if reads_clean_text(config) or config.clean.backend != CleanBackend.none:  # the judge reads cleaned text
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


@friendly
def triplets_command(
    ctx: typer.Context,
    run_dir: RunArg,
    triplets__judge: Annotated[
        JudgeKind | None, typer.Option("--judge", help="llm (an endpoint), model (offline, cleanlab) or none.")
    ] = None,
    triplets__llm__mode: Annotated[
        JudgeMode | None, typer.Option("--mode", help="llm: one call per triplet, or per anchor with k candidates.")
    ] = None,
    triplets__llm__base_url: Annotated[
        str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    ] = None,
    triplets__llm__model: Annotated[
        str | None, typer.Option("--llm-model", help="The judge model's name at the endpoint.")
    ] = None,
    triplets__positive: Annotated[
        PositiveStrategy | None, typer.Option("--positive", help="Same-class ad (nearest/random/farthest) or label.")
    ] = None,
    triplets__max_anchors_per_class: Annotated[
        int | None, typer.Option("--max-anchors-per-class", min=1, help="Cap of anchors per class.")
    ] = None,
    triplets__min_anchors_per_class: Annotated[
        int | None, typer.Option("--min-anchors-per-class", min=1, help="Floor of anchors per class.")
    ] = None,
    triplets__negatives_per_anchor: Annotated[
        int | None, typer.Option("--negatives", min=1, help="Negatives per anchor.")
    ] = None,
    triplets__confused_classes: Annotated[
        int | None, typer.Option("--confused-classes", min=0, help="Negatives from this many most-confused classes.")
    ] = None,
    triplets__relative_margin: Annotated[
        float | None,
        typer.Option(
            "--margin", min=0.01, max=1.0, help="Negatives score below this x the anchor's nearest same-class ad's."
        ),
    ] = None,
    triplets__noise_filter: Annotated[
        NoiseFilter | None, typer.Option("--noise-filter", help="model judge: cleanlab's filter_by method.")
    ] = None,
    triplets__judge_probs: Annotated[
        Path | None,
        typer.Option(
            "--judge-probs",
            help="model judge, second round: a first round's RUN/report/oof/<system>.parquet replaces its own "
            "probabilities.",
        ),
    ] = None,
    triplets__llm__concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Calls in flight.")
    ] = None,
    triplets__llm__requests_per_minute: Annotated[
        int | None, typer.Option("--rpm", min=1, help="Requests per minute limit.")
    ] = None,
    triplets__llm__tokens_per_minute: Annotated[
        int | None, typer.Option("--tpm", min=100, help="Tokens per minute limit.")
    ] = None,
    triplets__llm__max_cost: Annotated[
        float | None, typer.Option("--max-cost", min=0.0, help="Stop (resumable) before spending this many USD.")
    ] = None,
    triplets__llm__allow_raw_text: Annotated[
        bool | None,
        typer.Option(
            "--send-raw-text/--no-send-raw-text", help="Allow raw ads (personal data) to an endpoint off this machine."
        ),
    ] = None,
    embed__model: ModelOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print calls, tokens and cost the llm judge needs; send nothing.")
    ] = False,
    batch_file: Annotated[
        Path | None, typer.Option("--batch-file", help="Write the llm calls as an OpenAI Batch API JSONL and stop.")
    ] = None,
    import_batch: Annotated[
        Path | None, typer.Option("--import-batch", help="Read a Batch API output JSONL into the call cache first.")
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Mine anchor/positive/negative triplets in the training split and judge them (an LLM, a model or none).

    Triplets come from the training split (a small validation set from val; the test split is never read); the judge is
    an LLM at any OpenAI-compatible endpoint (key from OPENAI_API_KEY only), an offline model (cleanlab, the default) or
    none. Writes RUN/triplets/: train.parquet, val.parquet, candidates/, noise.csv (probably mislabelled ads),
    report.md. With --judge-probs the model judge reads a first round's out-of-fold probabilities (e.g.
    RUN1/report/oof/<fine-tuned fusion>.parquet) instead of fitting its own: a second round of judging with a better
    model."""
    from jobembed.triplets import client

    values, flags = overrides(dict(locals()), ctx)
    cfg = config_for_run(run_dir, config, values, flags=flags)
    store = open_store(cfg.embed.cache_dir or default_cache_dir())
    if import_batch is not None:
        counts = client.import_batch(import_batch, store=store)
        console.print(
            f"[green]imported[/] {counts['imported']} answers ({counts['errors']} errored lines) from {import_batch}"
        )
    if dry_run or batch_file is not None:
        if cfg.triplets.judge != JudgeKind.llm:
            raise JobembedError("--dry-run and --batch-file are for the llm judge", fix="add --judge llm")
        run_stages(cfg, target="embed", progress=not quiet, on_stage=print_stage)
        inputs = triplet_inputs(pin_models(cfg))
        triplets_core.check_privacy(cfg.triplets, inputs.judge_reads)
        candidates, _ = triplets_core.mine(inputs, cfg.triplets)
        job = triplets_core.llm_job(inputs, candidates, cfg.triplets)
        if batch_file is not None:
            n = client.write_batch(job.calls, batch_file, store=store)
            console.print(
                f"[green]wrote[/] {n} requests to {batch_file} ({len(job.calls) - n} already answered). Upload it to "
                f"the Batch API, then: jobembed triplets {run_dir} --import-batch OUTPUT.jsonl"
            )
            return
        est = client.plan(
            job.calls,
            config=cfg.triplets.llm,
            store=store,
            expected_completion_tokens=triplets_core.EXPECTED_COMPLETION_TOKENS[JudgeMode(cfg.triplets.llm.mode)],
        )
        console.print(
            f"dry run ({cfg.triplets.llm.model}, {cfg.triplets.llm.mode}): {len(candidates)} candidate triplets, "
            f"{est['calls']} calls, {est['cached']} cached, {est['to_send']} to send; "
            f"~{est['prompt_tokens_est']:,} prompt + ~{est['completion_tokens_est']:,} completion tokens; "
            f"~${est['cost_est']:.2f} (Batch API ~${est['batch_cost_est']:.2f}). Nothing was sent."
        )
        return
    run_stages(cfg, target="triplets", force=force, progress=not quiet, on_stage=print_stage)
    console.print(triplets_line(read_json(cfg.run_dir / "triplets" / "report.json"), cfg.run_dir / "triplets"))


def triplets_line(r: dict[str, Any], folder: Path) -> str:
    """One plain line on what triplets did, which judge and what it cost."""
    train = r["splits"]["train"]
    judge = r["judge"]
    if r["judge_kind"] == "model":
        judge += " (offline: cleanlab on out-of-fold probabilities of the frozen encoder and TF-IDF; no LLM called)"
    line = (
        f"[green]triplets[/] judged by {judge}: kept {train['kept']} of {train['candidates']} training and "
        f"{r['splits']['val']['kept']} validation triplets; {r['noise']['ads']} ads flagged as probably mislabelled"
    )
    if "llm" in r:
        c = r["llm"]
        line += f"; {c['answered']} calls now, {c['cached']} cached, ${c['cost']:.4f}"
        if c.get("note"):
            line += f" [yellow]({c['note']})[/]"
    return f"{line} → {folder / 'report.md'}"


register(
    Stage(
        "triplets",
        section="triplets",
        formerly=("make-triplets",),
        reads=("text_column", "clean.backend"),
        inputs=("prepare", "clean", "embed"),
        consumes=triplets_consume,
        run=_run_make_triplets,
        identity=_triplets_identity,
        products=("train.parquet", "val.parquet"),
        names_models=names_models,
        summarise=True,
        help="mine anchor/positive/negative triplets in train (and val) and judge them: llm, model or none",
        # 2: the margin rule measures a candidate against the anchor's nearest same-class ad, not against its own
        # positive (random positives kept 73 of 576 triplets under the old rule), so older runs keep other triplets.
        # 3: a reused anchor's bar is its nearest ad (was its n-th), random positives draw from their own generator
        # (anchors no longer move with the positive strategy), and the model judge's folds keep reposts together.
        version=3,
        command=triplets_command,
    )
)
