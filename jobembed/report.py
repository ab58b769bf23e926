"""``write_report``: an ``Evaluation`` (``jobembed.evaluate``) as files a person and a program can read.

Outputs in ``out_dir`` (the run's ``report/``), built under a temporary name and swapped in whole, so a
re-run never leaves tables or figures of systems it no longer has:

- ``report.md``: the answer first, then every system with intervals, significance, per-class detail;
- ``index.html``: the same as one self-contained page (figures inlined, sortable tables, no ad text; ``report_page``);
- ``metrics.json``: everything in the report, for programs (format ``jobembed-report/4``);
- ``per_class/<system key>.csv``, ``figures/*.png``, ``config.yaml`` (the resolved config);
- ``oof/``: every CV system's out-of-fold probabilities of the dev ads (``jobembed.oof``), which a second round's
  model judge reads (``triplets.judge_probs``);
- ``winner/``: the best system a bundle can serve (MLP head, hybrid head or cosine prototypes) as ``head/``
  files plus ``winner.json`` (with the out-of-fold confidences its abstention threshold was chosen on, from which
  ``classify --target-accuracy`` computes the same threshold); the ``bundle`` stage packages it with labels and
  the encoder reference.

Tables show readable system names (``mlp@multilingual-e5-small``); files use the unique keys, which add
the encoder's fingerprint (``mlp@multilingual-e5-small-1a2b3c4d``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pydantic import BaseModel

from jobembed import metrics as M
from jobembed.artifacts import atomic_dir, write_json
from jobembed.config import write_resolved
from jobembed.evaluate import HYBRID_SYSTEMS, SYSTEM_TITLES, Evaluation
from jobembed.oof import write_oof
from jobembed.report_page import PageExtras, confusion_pairs, render_page, suspected_noise

WINNER_DIR = "winner"
OOF_DIR = "oof"
# The same kind of system as the winner, on the fine-tuned encoder (bundle.encoder: finetuned).
WINNER_FINETUNED_DIR = "winner-finetuned"


def head_kind(system: str) -> str:
    """How a bundle stores a system's head: ``mlp``, ``hybrid``, ``topdown`` or ``cosine``."""
    if system in ("mlp", "hier", "e2e"):
        return "mlp"
    if system == "topdown":
        return "topdown"
    return "hybrid" if system in HYBRID_SYSTEMS else "cosine"


def _selective_for_bundle(entry: dict[str, Any], oof: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any] | None:
    """What a bundle needs for ``classify --target-accuracy``: the out-of-fold ``(confidence, correct)`` pairs the
    report's threshold was chosen on (so any target's threshold is computed by the same rule), and that threshold."""
    sel = entry.get("selective")
    if not sel:
        return None
    out = {k: sel[k] for k in ("target_accuracy", "threshold", "chosen_on", "oof", "oof_curve")}
    if oof is not None:
        out["oof_scores"] = {"confidence": [float(c) for c in oof[0]], "correct": [bool(c) for c in oof[1]]}
    return out


def write_report(evaluation: Evaluation, *, out_dir: Path, resolved: BaseModel, labels: pd.DataFrame) -> Path:
    """Write the report folder (see the module docstring); returns ``out_dir``.

    Args:
        evaluation: the result of ``evaluate_systems``.
        out_dir: the report folder; replaced as a whole.
        resolved: the run's resolved config, written next to the report as config.yaml (nothing else is read).
        labels: ``labels.json`` as a frame, for category names in tables.
    """
    result = evaluation.metrics
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "per_class").mkdir()
        for key, table in evaluation.per_class.items():
            table.to_csv(tmp / "per_class" / f"{_file_key(key)}.csv", index=False)
        result = {**result, "figures": _figures(tmp / "figures", evaluation)}
        write_json(tmp / "metrics.json", result)
        write_resolved(resolved, tmp)
        if evaluation.oof_proba and evaluation.dev_ids is not None:
            cv = {k: s["cv"]["summary"]["macro_f1"]["mean"] for k, s in result["systems"].items() if s.get("cv")}
            write_oof(
                tmp / OOF_DIR,
                ids=evaluation.dev_ids,
                labels=evaluation.y_dev,
                probs=evaluation.oof_proba,
                file_keys={key: _file_key(key) for key in evaluation.oof_proba},
                macro_f1=cv,
            )
        (tmp / "report.md").write_text(
            render_markdown(result, labels=labels, per_class=evaluation.per_class[result["winner"]]), encoding="utf-8"
        )
        _write_page(tmp, result, evaluation, labels)
        best = result.get("bundled")
        if best is not None:
            system = result["systems"][best]
            evaluation.models[best].save(tmp / WINNER_DIR / "head")
            write_json(
                tmp / WINNER_DIR / "winner.json",
                {
                    "key": best,
                    "system": system["system"],
                    "head_kind": head_kind(system["system"]),
                    "encoder": system["encoder"],
                    "encoder_fingerprint": system["encoder_fingerprint"],
                    "encoder_precision": system["encoder_precision"],
                    "encoder_text_prompt": system["encoder_text_prompt"],
                    "metrics": {"test": system["test"], "cv": system["cv"]["summary"]},
                    "selective": _selective_for_bundle(system, evaluation.oof.get(best)),
                },
            )
            _save_finetuned_winner(tmp, result, evaluation, kind=system["system"])
    return Path(out_dir)


PAGE = "index.html"


def _write_page(tmp: Path, result: dict[str, Any], evaluation: Evaluation, labels: pd.DataFrame) -> None:
    """``report/index.html``: the report as one self-contained page (``jobembed.report_page``)."""
    winner = result["winner"]
    names = dict(zip(labels["label"].astype(str), labels["name"].astype(str), strict=True))
    extras = PageExtras(worst_pairs=confusion_pairs(evaluation.y_test, evaluation.test_predictions[winner]))
    if winner in evaluation.oof_pred and evaluation.dev_ids is not None:
        confidence, _ = evaluation.oof[winner]
        extras.noise = suspected_noise(
            evaluation.dev_ids,
            evaluation.y_dev,
            evaluation.oof_pred[winner],
            confidence,
            threshold=extras.noise_confidence,
        )
    page = render_page(
        result,
        answer=_answer(result),
        figures_dir=tmp,
        names=names,
        per_class=evaluation.per_class[winner],
        extras=extras,
        cleaning=_cleaning_line(result["data"].get("cleaning")),
        confusion_figure=f"figures/confusion-{_file_key(winner)}.png",
    )
    (tmp / PAGE).write_text(page, encoding="utf-8")


def _save_finetuned_winner(tmp: Path, result: dict[str, Any], evaluation: Evaluation, *, kind: str) -> None:
    """The fine-tuned encoder's system of the winner's kind, for ``bundle.encoder: finetuned``.

    Not ranked against the frozen systems (its CV would be leaky): the kind is the one CV picked on the frozen
    encoder, and whether to serve it fine-tuned is the user's call on the test-split comparison in the report.
    """
    tuned = (result.get("finetuned") or {}).get("systems", {}) or {
        k: r for k, r in result["systems"].items() if r.get("finetuned_cv")
    }
    key = next((k for k, r in tuned.items() if r["system"] == kind and k in evaluation.models), None)
    if key is None:
        return
    system = tuned[key]
    source = (result.get("finetuned") or {}).get("source") or result.get("finetune_cv")
    evaluation.models[key].save(tmp / WINNER_FINETUNED_DIR / "head")
    write_json(
        tmp / WINNER_FINETUNED_DIR / "winner.json",
        {
            "key": key,
            "system": kind,
            "head_kind": head_kind(kind),
            "encoder": system["encoder"],
            "encoder_fingerprint": system["encoder_fingerprint"],
            "encoder_precision": system["encoder_precision"],
            "encoder_text_prompt": system["encoder_text_prompt"],
            "metrics": {
                "test": system["test"],
                "cv": system["cv"]["summary"] if system.get("cv") else None,
                "trained_on": source,
            },
            "selective": _selective_for_bundle(system, evaluation.oof.get(key) if system.get("cv") else None),
        },
    )


def _file_key(key: str) -> str:
    return key.replace("/", "_").replace("\\", "_")


def _figures(folder: Path, evaluation: Evaluation) -> list[str]:
    results, ranking = evaluation.metrics["systems"], evaluation.metrics["ranking"]
    y_test, preds, label_order = evaluation.y_test, evaluation.test_predictions, evaluation.label_order
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ranking) + 1.5))
    means = [results[k]["cv"]["summary"]["macro_f1"]["mean"] for k in ranking]
    stds = [results[k]["cv"]["summary"]["macro_f1"]["std"] for k in ranking]
    names = [results[k]["display"] for k in ranking]
    ax.barh(names[::-1], means[::-1], xerr=stds[::-1], color="#4c72b0", capsize=3)
    ax.set_xlabel("macro-F1, k-fold CV (mean ± std)")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(folder / "cv_macro_f1.png", dpi=120)
    plt.close(fig)
    written.append("figures/cv_macro_f1.png")
    written += _selective_figures(folder, evaluation)
    for key in ranking:
        cm = M.confusion(y_test, preds[key], labels=label_order).astype(float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # row-normalised: recall per true class
        size = max(5, 0.28 * len(label_order) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(label_order)), label_order, rotation=90, fontsize=7)
        ax.set_yticks(range(len(label_order)), label_order, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{results[key]['display']}: test confusion (row-normalised)")
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        name = f"figures/confusion-{_file_key(key)}.png"
        fig.savefig(folder.parent / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _selective_figures(folder: Path, evaluation: Evaluation) -> list[str]:
    """Coverage-accuracy curves of every system on test; reliability of the winner before/after temperature."""
    results, ranking, winner = (
        evaluation.metrics["systems"],
        evaluation.metrics["ranking"],
        evaluation.metrics["winner"],
    )
    with_sel = [k for k in ranking if results[k].get("selective")]
    if not with_sel:
        return []
    target = results[with_sel[0]]["selective"]["target_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in with_sel:
        c = results[key]["selective"]["test_curve"]
        ax.plot(c["coverage"], c["accuracy"], label=results[key]["display"], lw=2 if key == winner else 1)
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("coverage (share of test ads answered, most confident first)")
    ax.set_ylabel("accuracy of the answered ads")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Selective classification on test")
    fig.tight_layout()
    fig.savefig(folder / "coverage_accuracy.png", dpi=120)
    plt.close(fig)
    written = ["figures/coverage_accuracy.png"]
    cal = (results[winner].get("selective") or {}).get("calibration")
    if cal:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        for name, rel in (("before", cal["reliability"]), ("after temperature scaling", cal["reliability_scaled"])):
            ece = cal["ece_test"] if name == "before" else cal["ece_test_scaled"]
            ax.plot(rel["confidence"], rel["accuracy"], marker="o", label=f"{name} (ECE {ece:.3f})")
        ax.set_xlabel("mean confidence in bin")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(f"{results[winner]['display']}: reliability on test")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "reliability.png", dpi=120)
        plt.close(fig)
        written.append("figures/reliability.png")
    return written


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _cleaning_line(cleaning: dict[str, Any] | None) -> str:
    """Which cleaning fed every system (all systems read the same text column)."""
    if not cleaning or cleaning.get("text_column") != "clean_text":
        return "Cleaning: none; every system read the raw ad text (`text`)."
    c = cleaning["cleaner"]
    what = f"`{c['backend']}`" + (f" ({c['language']})" if c.get("language") else "")
    if c.get("model"):
        what += f" with extractor `{c['model']}` ({c['model_fingerprint']})"
    src = cleaning.get("sources") or {}
    return (
        f"Cleaning: every system read the clean stage's text (`clean_text`), cleaned by {what}; "
        f"{cleaning.get('mean_chars', {}).get('before', '?')} → {cleaning.get('mean_chars', {}).get('after', '?')} "
        f"characters per ad on average; sources {', '.join(f'{k} {v}' for k, v in src.items())}."
    )


def render_markdown(metrics: dict[str, Any], *, labels: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """The human report: the answer first, then the table, significance and per-class detail."""
    res, ranking, winner, data = metrics["systems"], metrics["ranking"], metrics["winner"], metrics["data"]
    k = data["cv_folds"]
    lines = [
        "# jobembed report",
        "",
        f"Data: {data['train']} train, {data['val']} validation, {data['test']} test ads; "
        f"{data['classes']} classes with ads ({data.get('labels', data['classes'])} in the label set); "
        f"text column `{data['text_column']}`. CV: {k}-fold stratified over train+validation, reposts kept in one "
        "fold. Test: fit on train (the MLP stops early on validation), scored once on the held-out test split.",
        "",
        _cleaning_line(data.get("cleaning")),
        "",
        "## Answer",
        "",
    ]
    lines += _answer(metrics)
    lines += [
        "",
        "## All systems (sorted by CV macro-F1)",
        "",
        "| system | CV macro-F1 | CV accuracy | test accuracy [95% CI] | test macro-F1 [95% CI] | "
        "test macro-F1 (classes ≥ min support) | test weighted F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ranking:
        r = res[key]
        cv, t, ci = r["cv"]["summary"], r["test"], r["test_ci95"]
        lines.append(
            f"| {r['display']}{' **(best)**' if key == winner else ''} | {_fmt(cv['macro_f1']['mean'])} ± "
            f"{_fmt(cv['macro_f1']['std'])} | {_fmt(cv['accuracy']['mean'])} ± {_fmt(cv['accuracy']['std'])} | "
            f"{_fmt(t['accuracy'])} [{_fmt(ci['accuracy'][0])}, {_fmt(ci['accuracy'][1])}] | {_fmt(t['macro_f1'])} "
            f"[{_fmt(ci['macro_f1'][0])}, {_fmt(ci['macro_f1'][1])}] | {_fmt(t['macro_f1_min_support'])} | "
            f"{_fmt(t['weighted_f1'])} |"
        )
    lines += [
        "",
        "Precision and recall (test, macro / weighted):",
        "",
        "| system | macro P | macro R | weighted P | weighted R |",
        "|---|---|---|---|---|",
    ]
    for key in ranking:
        t = res[key]["test"]
        lines.append(
            f"| {res[key]['display']} | {_fmt(t['macro_precision'])} | {_fmt(t['macro_recall'])} | "
            f"{_fmt(t['weighted_precision'])} | {_fmt(t['weighted_recall'])} |"
        )
    lines += [
        "",
        f"## Significance: {res[winner]['display']} against each other system",
        "",
        "McNemar: exact two-sided test on the test ads that exactly one of the two systems gets right. "
        "CV t-test: Nadeau-Bengio corrected resampled t-test on per-fold macro-F1.",
        "",
        "| other system | test: only best right | test: only other right | McNemar p | CV macro-F1 diff | "
        "corrected t-test p |",
        "|---|---|---|---|---|---|",
    ]
    for pair in metrics["pairwise"]:
        m, t = pair["mcnemar_test"], pair["cv_macro_f1_ttest"]
        lines.append(
            f"| {res[pair['b']]['display']} | {m['a_only']} | {m['b_only']} | {m['p_value']:.3g} | "
            f"{t['mean_diff']:+.3f} | {_fmt_p(t['p_value'])} |"
        )
    lines += _hierarchy_section(metrics)
    lines += _selective_section(metrics)
    names = dict(zip(labels["label"].astype(str), labels["name"].astype(str), strict=True))
    lines += _taxonomy_rows_section(metrics)
    lines += _rare_classes_section(metrics, names)
    lines += [
        "",
        f"## Per class ({res[winner]['display']}, test split)",
        "",
        "Every system's table is in `per_class/<system key>.csv`.",
        "",
        "| label | name | precision | recall | F1 | support | predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in per_class.sort_values("support", ascending=False).itertuples():
        lines.append(
            f"| {row.label} | {names.get(row.label, '')} | {row.precision:.3f} | {row.recall:.3f} | "
            f"{row.f1:.3f} | {row.support} | {row.predicted} |"
        )
    if metrics.get("finetuned"):
        lines += _finetuned_section(metrics)
    if metrics.get("finetune_cv"):
        lines += _finetune_cv_section(metrics)
    if metrics.get("finetune_seeds"):
        lines += _seeds_section(metrics)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in metrics["figures"]]
    if metrics.get("bundled"):
        lines += [
            "",
            f"`winner/` holds **{res[metrics['bundled']]['display']}**, the best system a bundle can serve (MLP, "
            "hybrid or hierarchy head, or cosine prototypes on an encoder); the `bundle` stage packages it in "
            "`../bundle/`.",
        ]
    return "\n".join(lines) + "\n"


def _taxonomy_rows_section(metrics: dict[str, Any]) -> list[str]:
    """What the taxonomy's texts added to the training side (``report.taxonomy_rows``)."""
    t = metrics.get("taxonomy_rows")
    if not t:
        return []
    return [
        "",
        "## Taxonomy rows",
        "",
        f"{t['rows']} texts of the label taxonomy (kinds: {', '.join(t['kinds'])}) joined the training side of every "
        f"fit of {', '.join(t['systems'])}, each weighing {t['weight']:g} of an ad; they reach {t['labels_reached']} "
        "labels. They are never in a validation slice, a held-out fold or the test split (they are not ads), so "
        "every figure above is still measured on ads alone.",
    ]


def _rare_classes_section(metrics: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Per-class F1 of the rare classes over the pooled out-of-fold answers, for the best few systems."""
    rare = metrics.get("rare_classes_oof") or {}
    classes = rare.get("classes") or {}
    if not classes:
        return []
    shown = [k for k in metrics["ranking"] if k in rare["systems"]][:4]
    res = metrics["systems"]
    lines = [
        "",
        f"## Rare classes (at most {rare['max_ads']} dev ads): F1 over the pooled out-of-fold answers",
        "",
        "Every dev ad is predicted once, by the fold model that did not see it or its reposts, so a class with 10 ads "
        "has 10 answers here instead of the 1-2 it has on test (where F1 is noise). All systems: "
        "`metrics.json` → `rare_classes_oof`.",
        "",
        "| label | name | dev ads | " + " | ".join(res[k]["display"] for k in shown) + " |",
        "|---|---|---|" + "---|" * len(shown),
    ]
    for label, count in classes.items():
        cells = " | ".join(_fmt(rare["systems"][k][label]["f1"]) for k in shown)
        lines.append(f"| {label} | {names.get(label, '')} | {count} | {cells} |")
    return lines


def _hierarchy_section(metrics: dict[str, Any]) -> list[str]:
    """Both levels from one model: every system's answers mapped to their parent class."""
    h = metrics.get("hierarchy") or {}
    res, ranking = metrics["systems"], metrics["ranking"]
    lines = ["", "## Parent level (label hierarchy)", "", f"{h.get('note', 'no hierarchy information')}."]
    if not h.get("parents"):
        return lines
    lines += [
        "Each system's parent-level answer is the parent of its predicted class, so the two levels never "
        "disagree. `hier` is the MLP trained with a second loss on the parent level.",
        "",
        "| system | CV parent macro-F1 | CV parent accuracy | test parent macro-F1 | test parent accuracy |",
        "|---|---|---|---|---|",
    ]
    for key in ranking:
        cv, t = res[key]["cv"]["summary"], res[key].get("test_parent") or {}
        pm, pa = cv.get("parent_macro_f1"), cv.get("parent_accuracy")
        lines.append(
            f"| {res[key]['display']} | {_fmt(pm['mean']) + ' ± ' + _fmt(pm['std']) if pm else '–'} | "
            f"{_fmt(pa['mean']) + ' ± ' + _fmt(pa['std']) if pa else '–'} | {_fmt(t.get('macro_f1'))} | "
            f"{_fmt(t.get('accuracy'))} |"
        )
    return lines


def _selective_section(metrics: dict[str, Any]) -> list[str]:
    """Abstention: the threshold chosen on out-of-fold answers and what it gives on test; calibration."""
    res, ranking = metrics["systems"], metrics["ranking"]
    rows = [k for k in ranking if res[k].get("selective")]
    if not rows:
        return []
    target = res[rows[0]]["selective"]["target_accuracy"]
    lines = [
        "",
        "## Knowing when to abstain",
        "",
        f"Per system, the lowest confidence threshold at which its out-of-fold answers over the dev pool reach "
        f"{target:.0%} accuracy (each ad answered, in cross-validation, by the fold model that did not see it or its "
        "reposts); below it the ad goes to a person. Not the validation split: it stopped the MLP early, calibrated it "
        "and picked the fusion weight, so its confidences are optimistic. Test shows what the threshold really gives "
        "(coverage = share of test ads answered). ECE: expected calibration error on test before temperature scaling "
        "(the MLP heads at temperature 1, other systems as they come) and after one temperature fit on validation "
        "(what the MLP heads serve). `classify --target-accuracy` computes its threshold from the same out-of-fold "
        "answers, stored in the bundle.",
        "",
        "| system | threshold (out-of-fold) | dev coverage (out-of-fold) | test coverage | test accuracy of answered "
        "| test ECE | ECE after temperature |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in rows:
        s = res[key]["selective"]
        c = s["calibration"]
        lines.append(
            f"| {res[key]['display']} | {_fmt(s['threshold'])} | {_fmt((s['oof'] or {}).get('coverage'))} | "
            f"{_fmt(s['test']['coverage'])} | {_fmt(s['test']['accuracy'])} | {_fmt(c['ece_test'])} | "
            f"{_fmt(c['ece_test_scaled'])} |"
        )
    return lines


def _finetuned_section(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned encoder's systems: test split only, against the same system on the frozen encoder."""
    ft, res = metrics["finetuned"], metrics["systems"]
    src = ft["source"]
    lines = [
        "",
        "## Fine-tuned encoder (test split only)",
        "",
        f"`{src.get('model', '?')}` was fine-tuned from `{src.get('base_model', '?')}` on {src.get('rows', '?')} "
        f"triplets judged by `{src.get('judge', '?')}` ({src.get('loss', '?')}). Its triplets showed it the labels of "
        "training ads, so cross-validation over train + validation would not be a fair estimate and is not run; each "
        "system is fit on train and scored once on the test split, and compared (exact McNemar on test) with the "
        "same system on the frozen encoder.",
        "",
        "| system | test accuracy [95% CI] | test macro-F1 [95% CI] | frozen, same system: test macro-F1 | "
        "macro-F1 diff | only fine-tuned right / only frozen right | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ft["systems"].values():
        t, ci = r["test"], r["test_ci95"]
        frozen_key = next((k for k in r["mcnemar_vs"] if k != "tfidf"), None)
        frozen = res.get(frozen_key) if frozen_key else None
        m = r["mcnemar_vs"].get(frozen_key) if frozen_key else None
        diff = t["macro_f1"] - frozen["test"]["macro_f1"] if frozen else float("nan")
        lines.append(
            f"| {r['display']} ({r['title']}) | {_fmt(t['accuracy'])} [{_fmt(ci['accuracy'][0])}, "
            f"{_fmt(ci['accuracy'][1])}] | {_fmt(t['macro_f1'])} [{_fmt(ci['macro_f1'][0])}, "
            f"{_fmt(ci['macro_f1'][1])}] | {_fmt(frozen['test']['macro_f1']) if frozen else '–'} | "
            f"{diff:+.3f} | {m['a_only'] if m else '–'} / {m['b_only'] if m else '–'} | "
            f"{_fmt_p(m['p_value']) if m else '–'} |"
        )
    lines += [
        "",
        "One fine-tuning run is one draw: the spread over fine-tuning seeds is what tells a real lift from luck "
        + (
            "(next section)."
            if metrics.get("finetune_seeds")
            else "(`jobembed finetune RUN --seeds 13,14,15` fine-tunes the other seeds; the report then shows each)."
        ),
    ]
    return lines


def _seeds_section(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned systems seed by seed on the test split: the spread, the lift, McNemar per seed."""
    fs = metrics["finetune_seeds"]
    seeds = " / ".join(map(str, fs["seeds"]))
    lines = [
        "",
        f"## Fine-tuned encoder over {len(fs['seeds'])} seeds (test split)",
        "",
        f"Seeds {seeds}: {fs['note']}. Lift: the fine-tuned macro-F1 minus the same system's on the frozen encoder; "
        "± is the sample standard deviation over seeds. McNemar: exact, on the test ads, per seed.",
        "",
        f"| system | frozen macro-F1 | fine-tuned macro-F1, seeds {seeds} | mean ± sd | lift ± sd | accuracy mean ± sd "
        f"(frozen) | McNemar p vs frozen, seeds {seeds} | vs TF-IDF + LR |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ps(tests: list[dict[str, Any] | None]) -> str:
        return " / ".join(_fmt_p(t["p_value"]) if t else "–" for t in tests)

    for name, r in fs["systems"].items():
        f1, acc, lift = r["macro_f1"], r["accuracy"], r["lift"]
        lines.append(
            f"| {r['display']} ({name}) | {_fmt(r['frozen_macro_f1'])} | {' / '.join(_fmt(v) for v in f1['values'])} "
            f"| {_fmt(f1['mean'])} ± {_fmt(f1['std'])} | "
            + (f"{lift['mean']:+.3f} ± {lift['std']:.3f}" if lift else "–")
            + f" | {_fmt(acc['mean'])} ± {_fmt(acc['std'])} ({_fmt(r['frozen_accuracy'])}) | "
            f"{ps(r['mcnemar_frozen'])} | {ps(r['mcnemar_tfidf'])} |"
        )
    return lines


def _fmt_p(p: float) -> str:
    return "–" if p is None or np.isnan(p) else f"{p:.3g}"


def _finetune_cv_section(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned systems against the same system on the frozen encoder and against TF-IDF + LR."""
    res, recipe = metrics["systems"], metrics["finetune_cv"]
    lines = [
        "",
        "## Fine-tuned inside the CV",
        "",
        f"The recipe ({recipe['loss']} on triplets judged by {recipe['judge']}, positives {recipe['positive']}) was "
        f"run once per fold on that fold's training rows ({', '.join(map(str, recipe['fold_triplets']))} triplets); no "
        "fold's encoder saw a label of its held-out ads or their reposts. " + recipe["note"],
        "",
        "| fine-tuned system | CV macro-F1 | vs | CV difference | corrected t-test p | McNemar p (out-of-fold) | "
        "McNemar p (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in metrics["ranking"]:
        r = res[key]
        if not r.get("finetuned_cv"):
            continue
        cv = r["cv"]["summary"]["macro_f1"]
        for other, v in r.get("versus", {}).items():
            lines.append(
                f"| {r['display']} | {_fmt(cv['mean'])} ± {_fmt(cv['std'])} | {res[other]['display']} | "
                f"{v['cv_macro_f1_diff']:+.3f} | {_fmt_p(v['cv_macro_f1_ttest']['p_value'])} | "
                f"{_fmt_p(v['mcnemar_oof']['p_value'])} | {_fmt_p(v['mcnemar_test']['p_value'])} |"
            )
    lines += [
        "",
        f"With {metrics['data']['cv_folds']} folds the corrected t-test has {metrics['data']['cv_folds'] - 1} degrees "
        "of freedom; McNemar on the pooled out-of-fold answers uses every dev ad once.",
    ]
    return lines


def _headline(metrics: dict[str, Any]) -> list[str]:
    """With the recipe inside the CV: which system to use, by how much it beats the frozen cosine baseline and TF-IDF
    + LR, how sure, and what it costs: one paragraph for a portal's manager."""
    recipe = metrics.get("finetune_cv")
    if not recipe:
        return []
    res, ranking = metrics["systems"], metrics["ranking"]
    use = metrics.get("bundled") or metrics["winner"]
    r = res[use]

    def mf1(key: str) -> float:
        return res[key]["cv"]["summary"]["macro_f1"]["mean"]

    frozen_cosine = next(
        (k for k in ranking if res[k]["system"] == "centroid" and not res[k].get("finetuned_cv")), None
    )
    parts = [
        f"**Use {r['display']}** ({SYSTEM_TITLES[r['system']]}): CV macro-F1 {mf1(use):.3f} ± "
        f"{r['cv']['summary']['macro_f1']['std']:.3f} over {metrics['data']['cv_folds']} folds, test accuracy "
        f"{r['test']['accuracy']:.3f} and macro-F1 {r['test']['macro_f1']:.3f}."
    ]
    pairs = {p["b"]: p for p in metrics["pairwise"]}
    for other, what in ((frozen_cosine, "the frozen cosine baseline"), ("tfidf", "TF-IDF + LR")):
        if other is None or other not in res or other == use:
            continue
        p = pairs.get(other) if use == metrics["winner"] else None
        sure = (
            f" (corrected t-test p = {_fmt_p(p['cv_macro_f1_ttest']['p_value'])}, McNemar on test p = "
            f"{_fmt_p(p['mcnemar_test']['p_value'])})"
            if p
            else ""
        )
        parts.append(
            f"That is {mf1(use) - mf1(other):+.3f} CV macro-F1 against {what} ({res[other]['display']}){sure}."
        )
    if r.get("finetuned_cv"):
        secs = recipe["finetune_seconds"]
        parts.append(
            f"It costs a fine-tune ({secs['bundled'] / 60:.1f} minutes on {recipe['device']} for the bundled model, "
            f"{secs['folds'] / 60:.1f} for the {recipe['folds']} CV folds), ${recipe['llm_cost']:.2f} of LLM calls, "
            f"and {recipe['encode_seconds_per_1000']:.1f} s to encode 1,000 ads."
        )
    else:
        best_tuned = next((k for k in ranking if res[k].get("finetuned_cv")), None)
        if best_tuned:
            parts.append(
                f"Fine-tuning did not pay here: the best fine-tuned system, {res[best_tuned]['display']}, reaches "
                f"{mf1(best_tuned):.3f} ({mf1(best_tuned) - mf1(use):+.3f})."
            )
    return [" ".join(parts), ""]


def _seeds_bullets(metrics: dict[str, Any]) -> list[str]:
    """The fine-tuned MLP head (else the first fine-tuned system) over seeds, in one line."""
    fs = metrics.get("finetune_seeds")
    if not fs or not fs["systems"]:
        return []
    name = "mlp" if "mlp" in fs["systems"] else next(iter(fs["systems"]))
    r = fs["systems"][name]
    significant = sum(1 for t in r["mcnemar_frozen"] if t and t["p_value"] < 0.05 and t["a_only"] > t["b_only"])
    lift = (
        f" vs {_fmt(r['frozen_macro_f1'])} frozen ({r['lift']['mean']:+.3f} ± {r['lift']['std']:.3f})"
        if r["lift"]
        else ""
    )
    return [
        f"- Over {len(fs['seeds'])} fine-tuning seeds, {r['display']} ({SYSTEM_TITLES[name]}) scores test macro-F1 "
        f"{r['macro_f1']['mean']:.3f} ± {r['macro_f1']['std']:.3f}{lift}; better than the frozen encoder by McNemar "
        f"(p < 0.05) on {significant} of {len(fs['seeds'])} seeds."
    ]


def _answer(metrics: dict[str, Any]) -> list[str]:
    """One paragraph that answers the question the toolkit exists for, with the numbers."""
    res, winner = metrics["systems"], metrics["winner"]
    out = _headline(metrics)

    def cv(key: str) -> str:
        s = res[key]["cv"]["summary"]["macro_f1"]
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    pairs = {p["b"]: p for p in metrics["pairwise"]}
    for head_key in [k for k in res if res[k]["system"] == "mlp"]:
        enc = res[head_key]["encoder"]
        enc_name = res[head_key]["display"].split("@", 1)[1]
        for base in ("centroid", "zeroshot", "logreg"):
            base_key = next((k for k in res if res[k]["system"] == base and res[k]["encoder"] == enc), None)
            if base_key is None:
                continue
            diff = (
                res[head_key]["cv"]["summary"]["macro_f1"]["mean"] - res[base_key]["cv"]["summary"]["macro_f1"]["mean"]
            )
            verdict = "beats" if diff > 0 else "does not beat"
            out.append(
                f"- The MLP head {verdict} {SYSTEM_TITLES[base]} on `{enc_name}`: CV macro-F1 {cv(head_key)} vs "
                f"{cv(base_key)} ({diff:+.3f})."
            )
    if "tfidf" in res:
        best_emb = next((k for k in metrics["ranking"] if k != "tfidf"), None)
        if best_emb:
            diff = (
                res[best_emb]["cv"]["summary"]["macro_f1"]["mean"] - res["tfidf"]["cv"]["summary"]["macro_f1"]["mean"]
            )
            name = res[best_emb]["display"]
            who = (
                f"{name} beats TF-IDF + LR"
                if diff > 0
                else f"TF-IDF + LR beats every embedding system (a finding: {name} is {-diff:.3f} behind)"
            )
            out.append(f"- {who}: CV macro-F1 {cv(best_emb)} vs {cv('tfidf')}.")
    p = pairs.get(metrics["ranking"][1]) if len(metrics["ranking"]) > 1 else None
    sig = ""
    if p:
        pv = p["cv_macro_f1_ttest"]["p_value"]
        sig = (
            f" Against the runner-up {res[p['b']]['display']}: McNemar p = {p['mcnemar_test']['p_value']:.3g}, "
            f"corrected CV t-test p = {_fmt_p(pv)}."
        )
    out.append(f"- Best by CV macro-F1: **{res[winner]['display']}** ({cv(winner)}).{sig}")
    out += _seeds_bullets(metrics)
    sel = res[winner].get("selective")
    if sel and sel["threshold"] is not None:
        out.append(
            f"- Abstaining below confidence {sel['threshold']:.3f} (chosen on out-of-fold answers for "
            f"{sel['target_accuracy']:.0%} accuracy), {res[winner]['display']} answers {sel['test']['coverage']:.0%} "
            f"of the test ads at {sel['test']['accuracy']:.1%} accuracy."
        )
    return out
