"""report: every system on the same splits and folds: test, k-fold CV, intervals, significance (``report/``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from jobembed import encoders
from jobembed.artifacts import read_json
from jobembed.cli.base import (
    ConfigOpt,
    ExtraModelOpt,
    ForceOpt,
    ModelOpt,
    QuietOpt,
    RunArg,
    TextColOpt,
    console,
    friendly,
    overrides,
    require_run,
    stage_command,
    systems_list,
)
from jobembed.config import register_section
from jobembed.embed import short_name
from jobembed.engine import Patterns, Stage, StageContext, register
from jobembed.errors import DataError, JobembedError
from jobembed.evaluate import (
    EvalSettings,
    TunedCV,
    dev_pool,
    evaluate_finetuned,
    evaluate_systems,
    extra_rows,
    summarise_seeds,
)
from jobembed.report import WINNER_DIR, WINNER_FINETUNED_DIR, write_report
from jobembed.sections import ReportConfig, SystemName
from jobembed.stages._common import (
    encoder_part,
    names_models,
    prepared,
    reads_clean_text,
    run_vectors,
    taxonomy_rows,
    trains_on_taxonomy,
)
from jobembed.stages.finetune import extra_seeds, finetuned_model, finetuned_vectors, protocol_seeds
from jobembed.stages.finetune_cv import fold_vectors
from jobembed.stages.finetune_seeds import seed_vectors
from jobembed.tracking import Tracked

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig


register_section("report", ReportConfig)


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


def _report_consume(config: PipelineConfig) -> dict[str, Patterns]:
    out: dict[str, Patterns] = {
        "prepare": ("*",),
        "embed": encoder_part(
            config, config.embed.models(), also=("taxonomy/*",) if trains_on_taxonomy(config) else ()
        ),
        "embed-finetuned": ("*",),
        "finetune": ("ads_seen.json",),
        "finetune-cv": ("*",),
        "finetune-seeds": ("*",),
    }
    if reads_clean_text(config):
        out["clean"] = ("*",)
    return out


def _settings(config: PipelineConfig) -> EvalSettings:
    """What evaluation reads of the run, with the taxonomy rows ``report.taxonomy_rows`` asks for."""
    return EvalSettings.of(config, extra_rows(config, taxonomy_rows(config)))


def _run_compare_report(ctx: StageContext) -> dict[str, Any]:
    config = ctx.config
    splits, labels = prepared(config)
    refuse_leaky_encoders(config, splits)
    vectors = {m: run_vectors(config, m, splits, labels) for m in config.embed.models()}
    tuned_cv = _tuned_cv(config, splits, labels) if config.report.finetune_cv else None
    evaluation = evaluate_systems(
        settings=_settings(config),
        splits=splits,
        labels=labels,
        vectors=vectors,
        tuned_cv=tuned_cv,
        progress=ctx.progress,
    )
    evaluation.metrics["data"]["cleaning"] = _cleaning_summary(config)
    if tuned_cv is not None:
        evaluation.metrics["finetune_cv"] = _recipe(config, tuned_cv)
    elif config.finetune.enabled:
        evaluation.metrics["finetuned"] = _evaluate_finetuned(config, splits, labels, evaluation, ctx.progress)
    if config.finetune.enabled and extra_seeds(config):
        evaluation.metrics["finetune_seeds"] = _seed_protocol(config, splits, labels, evaluation, ctx.progress)
    write_report(evaluation, out_dir=ctx.out, resolved=config, labels=labels)
    return {"winner": evaluation.metrics["winner"], "bundled": evaluation.metrics["bundled"]}


def _frozen_base(config: PipelineConfig, base_model: str) -> str:
    """The frozen encoder a fine-tune is compared with: the one it was fine-tuned from when the report has it, else
    ``embed.model``."""
    refs = {encoders.resolve(m, cache_dir=config.embed.cache_dir, build=False).ref for m in config.embed.models()}
    if base_model in refs:
        return base_model
    return encoders.resolve(config.embed.model, cache_dir=config.embed.cache_dir, build=False).ref


def _tuned_cv(config: PipelineConfig, splits, labels) -> TunedCV:
    """The recipe inside the CV (finetune-cv's fold encoders) and the finetune stage's encoder for the test split."""
    info = read_json(config.run_dir / "finetune" / "finetune.json")
    dev = dev_pool(splits)
    return TunedCV(
        tuned=finetuned_vectors(config, splits, labels),
        folds=tuple(fold_vectors(config, dev, config.report.cv_folds)),
        base=_frozen_base(config, info["base_model"]),
        display=f"{short_name(str(info['base_model']))}-finetuned",
    )


def _recipe(config: PipelineConfig, tuned_cv: TunedCV) -> dict[str, Any]:
    """What the fine-tuned rows of the CV table are, and what they cost."""
    folds = read_json(config.run_dir / "finetune-cv" / "folds.json")
    info = read_json(config.run_dir / "finetune" / "finetune.json")
    triplets = config.run_dir / "triplets" / "report.json"
    on_triplets = info.get("data", "triplets") == "triplets"  # a loss on labels judged nothing
    llm = (read_json(triplets).get("llm") or {}) if on_triplets and triplets.is_file() else {}
    n_dev = len(tuned_cv.folds[0].dev)
    return {
        "model": str(tuned_cv.tuned.model),
        "base_model": info["base_model"],
        "loss": info["loss"],
        "judge": info["triplets"].get("judge"),
        "data": info.get("data", "triplets"),
        "positive": str(config.triplets.positive),
        "folds": folds["folds"],
        "fold_triplets": folds["triplets"],
        "finetune_seconds": {"folds": folds["finetune_seconds"], "bundled": info["seconds"]},
        "device": str(info.get("device") or config.finetune.device),  # where it ran, not "auto"
        "llm_cost": round(folds["llm_cost"] + float(llm.get("cost", 0.0)), 4),
        "encode_seconds_per_1000": round(1000 * folds["encode_seconds"] / max(1, folds["folds"] * n_dev), 1),
        "note": (
            "CV figures of the fine-tuned systems are those of the recipe (one fine-tune per fold on the fold's "
            "training rows); their test figures and the bundle are those of the finetune stage's model (train split, "
            "val for checkpoint choice, finetune.seed). The recipe's defaults (lr, loss, positives) were chosen "
            "earlier on a validation split that is now inside the CV pool."
        ),
    }


def _evaluate_finetuned(config: PipelineConfig, splits, labels, evaluation, progress: bool) -> dict[str, Any]:
    tuned = finetuned_vectors(config, splits, labels)
    info = read_json(config.run_dir / "finetune" / "finetune.json")
    # Compared with the same system on the encoder it was fine-tuned from (else on embed.model).
    refs = {r.get("encoder") for r in evaluation.metrics["systems"].values()}
    base = info["base_model"] if info["base_model"] in refs else _frozen_base(config, info["base_model"])
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
        settings=_settings(config),
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


def _main_seed(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The finetune stage's model's systems on test (system name -> the seed row of ``summarise_seeds``, with the
    frozen system's key), from the CV rows (``--finetune-cv``) or the test-only section."""
    out = {}
    if metrics.get("finetune_cv"):
        for r in metrics["systems"].values():
            if r.get("finetuned_cv"):
                versus = r.get("versus", {})
                frozen = r.get("frozen_key")
                out[r["system"]] = {
                    "frozen_key": frozen,
                    "mcnemar_frozen": versus[frozen]["mcnemar_test"] if frozen in versus else None,
                    "mcnemar_tfidf": versus["tfidf"]["mcnemar_test"] if "tfidf" in versus else None,
                } | {"display": r["display"], "macro_f1": r["test"]["macro_f1"], "accuracy": r["test"]["accuracy"]}
        return out
    for r in metrics["finetuned"]["systems"].values():
        frozen = next((k for k in r["mcnemar_vs"] if k != "tfidf"), None)
        out[r["system"]] = {
            "frozen_key": frozen,
            "mcnemar_frozen": r["mcnemar_vs"].get(frozen) if frozen else None,
            "mcnemar_tfidf": r["mcnemar_vs"].get("tfidf"),
        } | {"display": r["display"], "macro_f1": r["test"]["macro_f1"], "accuracy": r["test"]["accuracy"]}
    return out


def _seed_protocol(config: PipelineConfig, splits, labels, evaluation, progress: bool) -> dict[str, Any]:
    """Every seed of ``finetune.seeds`` on the test split: the finetune stage's model for ``finetune.seed``, the
    finetune-seeds stage's for the others; each system fit on train and scored once, exact McNemar per seed."""
    m = evaluation.metrics
    main = _main_seed(m)
    frozen_key_of = {name: row["frozen_key"] for name, row in main.items() if row["frozen_key"]}
    frozen = {
        name: {k: m["systems"][key]["test"][k] for k in ("macro_f1", "accuracy")} for name, key in frozen_key_of.items()
    }
    info = read_json(config.run_dir / "finetune" / "finetune.json")
    per_seed: dict[int, dict[str, Any]] = {config.finetune.seed: main}
    for seed, (vectors, seen) in seed_vectors(config, splits, like=finetuned_vectors(config, splits, labels)).items():
        result = evaluate_finetuned(
            settings=_settings(config),
            splits=splits,
            labels=labels,
            tuned=vectors,
            frozen_key_of=frozen_key_of,
            frozen_preds=evaluation.test_predictions,
            source={"base_model": info["base_model"], "positive": str(config.triplets.positive)},
            ads_seen=seen,
            progress=progress,
        )
        per_seed[seed] = {
            r["system"]: {
                "display": main.get(r["system"], {}).get("display", r["display"]),
                "macro_f1": r["test"]["macro_f1"],
                "accuracy": r["test"]["accuracy"],
                "mcnemar_frozen": r["mcnemar_vs"].get(frozen_key_of.get(r["system"], "")),
                "mcnemar_tfidf": r["mcnemar_vs"].get("tfidf"),
            }
            for r in result["systems"].values()
        }
    seeds_meta = read_json(config.run_dir / "finetune-seeds" / "seeds.json")
    return {
        "seeds": protocol_seeds(config),
        "bundled_seed": config.finetune.seed,
        "systems": summarise_seeds(per_seed, frozen=frozen),
        "finetune_seconds": {"bundled": info["seconds"], "other_seeds": seeds_meta["finetune_seconds"]},
        "note": (
            f"seed {config.finetune.seed} is the finetune stage's model (the one a bundle serves); every seed is the "
            "same recipe on the same kept triplets (with finetune.max_triplets, each seed draws its own sample), "
            "validation for the checkpoint choice, scored once on the test split"
        ),
    }


def _cleaning_summary(config: PipelineConfig) -> dict[str, Any]:
    """For the report: which text the systems read and, if cleaned, by what."""
    out: dict[str, Any] = {"text_column": str(config.text_column)}
    report = config.run_dir / "clean" / "report.json"
    if reads_clean_text(config) and report.is_file():
        r = read_json(report)
        out |= {"cleaner": r["cleaner"], "sources": r["sources"], "mean_chars": r["mean_chars"]}
    return out


@friendly
def report_command(
    ctx: typer.Context,
    run_dir: RunArg,
    embed__model: ModelOpt = None,
    embed__extra_models: ExtraModelOpt = None,
    report__systems: Annotated[
        str | None,
        typer.Option(
            "--systems", callback=systems_list, help=f"Comma list of {','.join(s.value for s in SystemName)}."
        ),
    ] = None,
    report__cv_folds: Annotated[int | None, typer.Option("--cv-folds", min=2, help="Cross-validation folds.")] = None,
    report__finetune_cv: Annotated[
        bool | None,
        typer.Option(
            "--finetune-cv/--no-finetune-cv",
            help="Fine-tune inside every CV fold (the finetune-cv stage), so the fine-tuned systems join the CV table "
            "and the ranking; turns finetune on (the test split and the bundle use its model).",
        ),
    ] = None,
    report__keep_fold_models: Annotated[
        bool | None,
        typer.Option("--keep-fold-models/--no-keep-fold-models", help="Keep each fold's fine-tuned model."),
    ] = None,
    report__max_new_folds: Annotated[
        int | None,
        typer.Option(
            "--max-new-folds", min=1, help="Fine-tune at most this many folds now, then stop (they are kept)."
        ),
    ] = None,
    pipeline__text_column: TextColOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the fine-tunes, encodes and LLM calls --finetune-cv and finetune.seeds would need, net of "
            "what is kept and cached; nothing runs.",
        ),
    ] = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare every system on every encoder with CV, one test-split reading, significance tests and abstention.

    Every system in report.systems runs on every encoder (embed.model and embed.extra_models), on the same
    repost-grouped splits and CV folds. Default systems: zero-shot cosine, centroid cosine, TF-IDF + LR, LR on
    embeddings, the MLP head and fusion (MLP + TF-IDF, late fusion); stack (stacked TF-IDF features) and hier (a head
    trained on both ISCO levels) on request. Systems are ranked by CV macro-F1 over train + val, each scored once on the
    test split with group-bootstrap intervals, corrected t-tests and McNemar against the winner, and an abstention
    threshold chosen on the CV's out-of-fold answers. When finetune is on, the fine-tuned encoder's systems get their
    own test-split section (not ranked: the CV pool holds ads it was trained on). With --finetune-cv the recipe is run
    inside every fold instead (finetune-cv: triplets mined, judged and fine-tuned on the fold's training rows only), and
    the fine-tuned systems join the CV table and the ranking, each compared with the same system on the frozen encoder
    and with TF-IDF + LR (corrected t-test, exact McNemar on the pooled out-of-fold answers and on test); the report
    opens with the answer and its cost. With finetune.seeds (`jobembed finetune RUN --seeds 13,14,15`) the fine-tuned
    systems are also scored on test once per fine-tuning seed (the finetune-seeds stage runs the other seeds first):
    each seed, the spread, and exact McNemar per seed.

    Writes RUN/report/ (report.md, metrics.json, per-class CSVs, figures, winner/ and, with a fine-tune,
    winner-finetuned/: the head a bundle serves).
    """
    params = dict(locals())
    if report__finetune_cv:
        params["finetune__enabled"] = True  # the fine-tuned rows' test figures and bundle are the finetune stage's
    if dry_run:
        _print_dry_run(params)
        return
    run = stage_command("report", params)
    metrics = read_json(run / "report" / "metrics.json")
    console.print(summary_table(metrics))
    for line in finetuned_lines(metrics) + selective_lines(metrics):
        console.print(line)
    console.print(f"[green]report[/] {run / 'report' / 'report.md'}")


def _print_dry_run(params: dict[str, Any]) -> None:
    """What `report` would fine-tune for --finetune-cv and finetune.seeds, from the stamps and the call cache;
    nothing runs or is written."""
    from jobembed.engine import config_for_run, describe, pin_models
    from jobembed.stages.finetune_cv import dry_run
    from jobembed.stages.finetune_seeds import seeds_todo

    require_run(params["run_dir"], params["config"])
    values, flags = overrides(params, params["ctx"])
    cfg = config_for_run(params["run_dir"], params["config"], values, flags=flags)
    seeds = extra_seeds(cfg) if cfg.finetune.enabled else []
    if not cfg.report.finetune_cv and not seeds:
        raise JobembedError(
            "--dry-run counts the fine-tunes of --finetune-cv and of finetune.seeds, and this run asks for neither",
            fix="add --finetune-cv, or set seeds with `jobembed finetune RUN --seeds 13,14,15`",
        )
    cfg = pin_models(cfg)
    states = {row["stage"]: row["state"] for row in describe(cfg)}
    tuned = "kept" if states["finetune"] == "current" else "1 fine-tune on train (the model a bundle serves)"
    if seeds:
        todo = seeds_todo(cfg)
        console.print(
            f"dry run: finetune stage: {tuned}; {len(seeds)} other seed(s) of finetune.seeds, {len(todo)} to fine-tune "
            f"and encode" + (f" ({', '.join(map(str, todo))})" if todo else "") + ". Nothing was run."
        )
    if not cfg.report.finetune_cv:
        return
    if states["embed"] != "current":
        raise JobembedError(
            "the frozen vectors are not made yet, and the count mines triplets with them",
            fix=f"run `jobembed embed {params['run_dir']}` first",
        )
    plan = dry_run(cfg)
    kept = plan["folds"] - len(plan["todo"])
    console.print(
        f"dry run: {plan['folds']} CV folds, {len(plan['todo'])} to fine-tune and encode"
        + (f" ({kept} kept)" if kept else "")
        + f"; finetune stage: {tuned}; report then fits every system on every fold's vectors. Nothing was run."
    )
    if plan["llm"] is not None:
        est = plan["llm"]
        console.print(
            f"llm judge ({cfg.triplets.llm.model}) for those folds: {est['calls']} calls, {est['cached']} cached, "
            f"{est['to_send']} to send, ~${est['cost_est']:.2f} (Batch API ~${est['batch_cost_est']:.2f}); the "
            f"finetune stage's own triplets: `jobembed triplets {params['run_dir']} --dry-run`."
        )


def selective_lines(metrics: dict[str, Any]) -> list[str]:
    """The bundled system's coverage-accuracy curve in a few points, and the threshold chosen on out-of-fold
    answers."""
    key = metrics.get("bundled")
    sel = metrics["systems"][key].get("selective") if key else None
    if not sel or not sel["test_curve"]["coverage"]:
        return []
    r, curve = metrics["systems"][key], sel["test_curve"]
    points = []
    for share in (0.25, 0.5, 0.75, 1.0):
        i = min(range(len(curve["coverage"])), key=lambda j: abs(curve["coverage"][j] - share))
        points.append(f"{curve['coverage'][i]:.0%} → {curve['accuracy'][i]:.1%}")
    out = [f"coverage → accuracy of {r['display']} on test, most confident first: " + ", ".join(points)]
    if sel["threshold"] is None:
        out.append(
            f"  no confidence threshold reached {sel['target_accuracy']:.0%} accuracy on the out-of-fold answers"
        )
    else:
        out.append(
            f"  abstaining below confidence {sel['threshold']:.3f} (out-of-fold answers of the CV, for "
            f"{sel['target_accuracy']:.0%}): "
            f"{sel['test']['coverage']:.0%} of test ads answered at {sel['test']['accuracy']:.1%} accuracy; "
            f"`classify --target-accuracy {sel['target_accuracy']}` uses it "
            "(figure: report/figures/coverage_accuracy.png)"
        )
    return out


def finetuned_lines(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned encoder's systems, test split only, against the same system on the frozen encoder."""
    out = _seed_lines(metrics)
    ft = metrics.get("finetuned")
    if not ft:
        return out
    out = [f"fine-tuned encoder ({ft['source'].get('rows')} triplets, {ft['source'].get('judge')}), test split only:"]
    for r in ft["systems"].values():
        frozen_key = next((k for k in r["mcnemar_vs"] if k != "tfidf"), None)
        frozen = metrics["systems"].get(frozen_key) if frozen_key else None
        m = r["mcnemar_vs"].get(frozen_key) if frozen_key else None
        tail = f" vs frozen {frozen['test']['macro_f1']:.3f} (McNemar p {m['p_value']:.3g})" if frozen and m else ""
        out.append(f"  {r['display']}: test macro-F1 {r['test']['macro_f1']:.3f}{tail}")
    return out + _seed_lines(metrics)


def _seed_lines(metrics: dict[str, Any]) -> list[str]:
    fs = metrics.get("finetune_seeds")
    if not fs:
        return []
    out = [f"fine-tuned systems over seeds {' / '.join(map(str, fs['seeds']))}, test split:"]
    for name, r in fs["systems"].items():
        lift = f" (lift {r['lift']['mean']:+.3f} ± {r['lift']['std']:.3f})" if r["lift"] else ""
        out.append(f"  {r['display']} {name}: macro-F1 {r['macro_f1']['mean']:.3f} ± {r['macro_f1']['std']:.3f}{lift}")
    return out


def summary_table(metrics: dict[str, Any]) -> Table:
    """The report's headline numbers as a rich table."""
    k = metrics["data"]["cv_folds"]
    table = Table(title=f"report ({k}-fold CV on train+val; test split held out)")
    for col in ("system", "CV macro-F1", "CV accuracy", "test accuracy", "test macro-F1", "test macro-F1 (≥min)"):
        if col == "system":
            table.add_column(col, overflow="fold", min_width=16)
        else:
            table.add_column(col, justify="right")
    for key in metrics["ranking"]:
        r = metrics["systems"][key]
        cv, t = r["cv"]["summary"], r["test"]
        name = r.get("display", key)
        table.add_row(
            f"[bold]{name}[/]" if key == metrics["winner"] else name,
            f"{cv['macro_f1']['mean']:.3f} ± {cv['macro_f1']['std']:.3f}",
            f"{cv['accuracy']['mean']:.3f} ± {cv['accuracy']['std']:.3f}",
            f"{t['accuracy']:.3f}",
            f"{t['macro_f1']:.3f}",
            f"{t['macro_f1_min_support']:.3f}",
        )
    return table


def _track(config: PipelineConfig, folder: Path) -> Tracked:
    """Every system's CV (mean and sd) and test figures, and the report, its page and figures as artifacts."""
    m = read_json(folder / "metrics.json")
    metrics: dict[str, float] = {}
    for r in m["systems"].values():
        cv, test, name = r["cv"]["summary"], r["test"], r["display"]
        for metric in ("macro_f1", "accuracy"):
            metrics[f"{name}.cv_{metric}_mean"] = cv[metric]["mean"]
            metrics[f"{name}.cv_{metric}_sd"] = cv[metric]["std"]
            metrics[f"{name}.test_{metric}"] = test[metric]
    artifacts = {"report": folder / "report.md", "page": folder / "index.html", "metrics": folder / "metrics.json"}
    return Tracked(metrics=metrics, artifacts=artifacts | {"figures": folder / "figures"})


register(
    Stage(
        "report",
        section="report",
        formerly=("compare-report",),
        reads=("head", "text_column", "prepare.seed", "embed.model", "embed.extra_models", "triplets.positive"),
        inputs=("prepare", "clean", "embed", "finetune", "embed-finetuned", "finetune-cv", "finetune-seeds"),
        consumes=_report_consume,
        run=_run_compare_report,
        products=(f"{WINNER_DIR}/*", f"{WINNER_FINETUNED_DIR}/*"),
        names_models=names_models,
        help="every system on the same splits: test, k-fold CV, intervals, significance",
        track=_track,
        # 2: abstention thresholds on out-of-fold answers (were validation's), stored for the bundle; the stack's
        # out-of-fold features grouped by repost; winner.json carries its encoder's precision and prompt. (The
        # rare-class table and the taxonomy rows are additions, not fixes: a report made before them stays current.)
        version=2,
        command=report_command,
    )
)
