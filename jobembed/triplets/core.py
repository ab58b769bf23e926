"""The triplets stage: mine candidates in the training and validation splits, judge them, write the datasets.

Writes ``RUN/triplets/``::

    train.parquet, val.parquet     kept triplets: a Hugging Face ``datasets`` table with anchor, positive,
                                   negative (texts) + ids, labels, similarity scores and the verdict columns
    candidates/{train,val}.parquet every mined candidate with its verdict (kept or not), to compare judges
    noise.csv                      ads the judge thinks are in the wrong class, with the class it suggests
    report.md, report.json         kept/rejected per class and reason, agreement with the labels, calls,
                                   tokens and cost, tokens per kept triplet
    config.yaml                    the resolved ``triplets`` section

``finetune`` reads ``train.parquet`` (and ``val.parquet`` for its evaluators) with
``datasets.load_dataset("parquet", data_files=...)``. Triplet texts are the run's ``text_column`` (what the
encoder is trained and evaluated on); the LLM judge reads the clean stage's text whenever one ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobembed.artifacts import atomic_write_text, write_json
from jobembed.data import label_texts
from jobembed.sections import JudgeKind, JudgeMode, TripletsConfig
from jobembed.store import Store
from jobembed.triplets import judges, llm
from jobembed.triplets.client import CallStats, api_key, is_loopback
from jobembed.triplets.mine import LABEL_PREFIX, Pool, mine_candidates

logger = logging.getLogger(__name__)

TRIPLETS_FORMAT = "jobembed-triplets/1"
POOLS = ("train", "val")  # never "test": the test split is read once, by report
# Expected reply sizes for --dry-run's cost estimate (a verdict object and a one-line reason).
EXPECTED_COMPLETION_TOKENS = {JudgeMode.pointwise: 60, JudgeMode.listwise: 90}


@dataclass
class TripletInputs:
    """What the stage reads, gathered by the pipeline.

    Attributes:
        frames: ``train``/``val`` frames with ``id``, ``label``, ``group``.
        texts: per split, the ad texts the triplets hold (the run's text_column), aligned with ``frames``.
        judge_texts: per split, what the LLM judge reads (the clean stage's text when one ran).
        judge_reads: ``clean_text`` or ``text``.
        labels: prepare's labels.json frame (``label``, ``name``, ``description``).
        vectors: per split, the frozen encoder's vectors, aligned with ``frames``; ``label_vectors`` per category.
        encoder: the frozen encoder's reference and fingerprint.
        label_text: what a label positive's text is (``positive: label``).
    """

    frames: dict[str, pd.DataFrame]
    texts: dict[str, pd.Series]
    judge_texts: dict[str, pd.Series]
    judge_reads: str
    labels: pd.DataFrame
    vectors: dict[str, np.ndarray]
    label_vectors: np.ndarray
    encoder: str
    fingerprint: str
    # What a label positive's text is (``data.label_texts`` mode): the category texts the run embeds (its
    # ``embed.label_text``; the label's own taxonomy texts in place of ``taxonomy_mean``, a mean of many texts).
    label_text: str = "name_description"


def check_privacy(config: TripletsConfig, judge_reads: str) -> str | None:
    """Raw ads may only go to an endpoint off this machine with ``llm.allow_raw_text``; returns a warning then."""
    if JudgeKind(config.judge) is not JudgeKind.llm or judge_reads != "text" or is_loopback(config.llm.base_url):
        return None
    where = config.llm.base_url or "api.openai.com"
    if not config.llm.allow_raw_text:
        from jobembed.errors import ConfigError

        raise ConfigError(
            f"the llm judge would send raw ads (names, phone numbers, e-mail addresses) to {where}",
            found="no clean stage ran (clean.backend none)",
            fix="clean the ads first (clean.backend rules or gliner2), or pass --send-raw-text to accept it",
        )
    return (
        f"sending raw ads, with the personal data they carry, to {where}; the prompts are also kept in the "
        "call cache (<cache>/store.sqlite3)"
    )


def mine(inputs: TripletInputs, config: TripletsConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Candidates of both pools, with a ``split`` column; validation ones mined within the val split alone."""
    label_vectors = dict(zip(inputs.labels["label"].astype(str), inputs.label_vectors, strict=True))
    frames, stats = [], {}
    for split in POOLS:
        frame = inputs.frames[split]
        cap = config.max_anchors_per_class if split == "train" else config.val_anchors_per_class
        if len(frame) < 2 or cap == 0:
            stats[split] = {"anchor_slots": 0}
            continue
        # An ad whose text is empty (cleaning left nothing) can be no part of a triplet.
        usable = (inputs.texts[split].astype(str).str.strip() != "").to_numpy() & (
            inputs.judge_texts[split].astype(str).str.strip() != ""
        ).to_numpy()
        pool = Pool(
            frame["id"].to_numpy()[usable],
            frame["label"].to_numpy()[usable],
            frame["group"].to_numpy()[usable],
            inputs.vectors[split][usable],
        )
        floor = min(config.min_anchors_per_class, cap) if split == "train" else 1
        found, s = mine_candidates(
            pool, config=config, max_anchors_per_class=cap, min_anchors_per_class=floor, label_vectors=label_vectors
        )
        found.insert(0, "split", split)
        frames.append(found)
        stats[split] = s | {"empty_texts": int((~usable).sum())}
    candidates = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split"])
    return candidates, stats


def categories(labels: pd.DataFrame) -> list[llm.Category]:
    return [
        llm.Category(str(r.label), str(r.name) or str(r.label), str(r.description))
        for r in labels.itertuples(index=False)
    ]


def text_map(inputs: TripletInputs, *, judge: bool) -> dict[str, str]:
    """Ad id (and ``label:<code>``) -> text; the judge's texts or the dataset's."""
    source = inputs.judge_texts if judge else inputs.texts
    out = {}
    for split in POOLS:
        out.update(zip(inputs.frames[split]["id"].astype(str), source[split].astype(str), strict=True))
    label_text = label_texts(inputs.labels, inputs.label_text)
    out.update({f"{LABEL_PREFIX}{c}": t for c, t in zip(inputs.labels["label"].astype(str), label_text, strict=True)})
    return out


def llm_job(inputs: TripletInputs, candidates: pd.DataFrame, config: TripletsConfig) -> judges.LLMJob:
    return judges.llm_job(
        candidates,
        texts=text_map(inputs, judge=True),
        categories=categories(inputs.labels),
        config=config.llm,
        seed=config.seed,
    )


def label_probs(inputs: TripletInputs, config: TripletsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(classes, train_probs, val_probs)``: out-of-fold on train, from a full-train fit on val."""
    classes, train_probs, (val_probs,) = judges.out_of_fold_probs(
        train_vectors=inputs.vectors["train"],
        train_texts=inputs.texts["train"].tolist(),
        train_labels=inputs.frames["train"]["label"].to_numpy(dtype=str),
        others=[(inputs.vectors["val"], inputs.texts["val"].tolist())],
        tfidf=config.model_tfidf,
        folds=config.cv_folds,
        seed=config.seed,
        groups=inputs.frames["train"]["group"].to_numpy(),
    )
    return classes, train_probs, val_probs


def judge_probs(inputs: TripletInputs, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(classes, train_probs, val_probs, system)`` from a first round's out-of-fold file
    (``triplets.judge_probs``); ``system`` is the first round's system key.

    Raises:
        DataError: the file is not a report's oof file, lacks a train or val ad, or has no column for one of their
            labels (it was made for other rows or another label set).
    """
    from jobembed.errors import DataError
    from jobembed.oof import read_oof

    oof = read_oof(path)
    present = set(inputs.frames["train"]["label"].astype(str)) | set(inputs.frames["val"]["label"].astype(str))
    unknown = sorted(present - set(oof.classes))
    if unknown:
        raise DataError(
            f"{path} has probabilities for {len(oof.classes)} classes, without {unknown[:5]} that these ads carry",
            fix="point triplets.judge_probs at report/oof/ of a run with the same prepare settings and data",
        )
    rows = {
        split: oof.rows_for(inputs.frames[split]["id"].to_numpy(), what=f"{split} ads", source=path) for split in POOLS
    }
    return oof.classes, rows["train"], rows["val"], oof.system


def label_models(
    inputs: TripletInputs,
    config: TripletsConfig,
    probs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, judges.LabelModel]:
    """cleanlab's flags for the train pool and the val pool (val with train's class thresholds)."""
    classes, train_probs, val_probs = probs if probs is not None else label_probs(inputs, config)
    train, val = inputs.frames["train"], inputs.frames["val"]
    models = {
        "train": judges.label_model(
            train["id"].to_numpy(),
            train["label"].to_numpy(dtype=str),
            classes,
            train_probs,
            noise_filter=config.noise_filter,
        )
    }
    if len(val):
        models["val"] = judges.label_model(
            val["id"].to_numpy(),
            val["label"].to_numpy(dtype=str),
            classes,
            val_probs,
            models["train"].thresholds,
            noise_filter=config.noise_filter,
        )
    return models


def make_triplets(
    *, inputs: TripletInputs, config: TripletsConfig, out_dir: Path, store: Store, progress: bool = True
) -> dict[str, Any]:
    """Mine, judge and write ``out_dir`` (see the module docstring). Returns the report's JSON."""
    warning = check_privacy(config, inputs.judge_reads)
    if warning:
        logger.warning(warning)
    if JudgeKind(config.judge) is JudgeKind.llm:
        api_key(config.llm)  # a missing key fails here, before any mining
    candidates, mining = mine(inputs, config)
    kind = JudgeKind(config.judge)
    if kind is JudgeKind.none or candidates.empty:
        verdicts = judges.judge_none(candidates)
    elif kind is JudgeKind.model:
        probs, first_round = None, None
        if config.judge_probs is not None:
            classes, train_probs, val_probs, first_round = judge_probs(inputs, config.judge_probs)
            probs = classes, train_probs, val_probs
        verdicts = judges.judge_model(candidates, models=label_models(inputs, config, probs))
        if first_round is not None:  # the report and every verdict name the probabilities it read
            verdicts.frame["judge"] = f"model:cleanlab/oof:{first_round}"
    else:
        job = llm_job(inputs, candidates, config)
        verdicts = judges.judge_llm(candidates, job=job, config=config.llm, store=store, progress=progress)
    table = pd.concat([candidates.reset_index(drop=True), verdicts.frame], axis=1)
    texts = text_map(inputs, judge=False)
    for role in ("anchor", "positive", "negative"):
        table.insert(
            list(table.columns).index("split") + 1 + ("anchor", "positive", "negative").index(role),
            role,
            table[f"{role}_id"].map(texts).astype(str),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "candidates").mkdir(exist_ok=True)
    for split in POOLS:
        part = table[table["split"] == split].drop(columns=["split"]).reset_index(drop=True)
        _write_dataset(part, out_dir / "candidates" / f"{split}.parquet")
        _write_dataset(part[part["keep"]].reset_index(drop=True), out_dir / f"{split}.parquet")
    noise = verdicts.noise.copy()
    judged_text = text_map(inputs, judge=True)
    noise["text"] = noise["id"].map(judged_text).fillna("").map(lambda t: " ".join(str(t).split())[:300])
    noise.to_csv(out_dir / "noise.csv", index=False)
    report = _report(table, noise, mining=mining, verdicts=verdicts, config=config, inputs=inputs, warning=warning)
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_md(report))
    return report


def _write_dataset(frame: pd.DataFrame, path: Path) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    tmp = path.with_name(f".{path.name}.tmp")
    Dataset.from_pandas(frame, preserve_index=False).to_parquet(str(tmp))
    tmp.replace(path)


def _report(
    table: pd.DataFrame,
    noise: pd.DataFrame,
    *,
    mining: dict[str, Any],
    verdicts: judges.Verdicts,
    config: TripletsConfig,
    inputs: TripletInputs,
    warning: str | None,
) -> dict[str, Any]:
    judge = str(table["judge"].iloc[0]) if len(table) else str(config.judge)
    splits = {}
    for split in POOLS:
        part = table[table["split"] == split]
        anchors = part.drop_duplicates(["slot"])
        splits[split] = {
            "anchor_slots": int(mining.get(split, {}).get("anchor_slots", 0)),
            "anchors_used": int(part["anchor_id"].nunique()),
            "candidates": len(part),
            "kept": int(part["keep"].sum()),
            "reasons": {r: int(n) for r, n in part["reason"].value_counts().items()},
            "no_positive": int(mining.get(split, {}).get("no_positive", 0)),
            "no_negative": int(mining.get(split, {}).get("no_negative", 0)),
            "short_of_negatives": int(mining.get(split, {}).get("short_of_negatives", 0)),
            "empty_texts_skipped": int(mining.get(split, {}).get("empty_texts", 0)),
            # How often the judge agrees with what the labels imply (same class = same job, other class = other).
            "agreement": {
                "positive_same": _share(part["positive_ok"]),
                "negative_different": _share(part["negative_ok"]),
                "anchor_label": _share(anchors["anchor_suggested"] == ""),
            },
        }
    train = table[table["split"] == "train"]
    per_class = []
    for label, part in train.groupby("anchor_label", sort=True):
        row = {"label": str(label), "candidates": len(part), "kept": int(part["keep"].sum())}
        row |= {r: int((part["reason"] == r).sum()) for r in judges.REASONS if r != "ok"}
        per_class.append(row)
    kept = int(table["keep"].sum())
    out: dict[str, Any] = {
        "format": TRIPLETS_FORMAT,
        "judge": judge,
        "judge_kind": str(config.judge),
        "judge_reads": inputs.judge_reads if JudgeKind(config.judge) is JudgeKind.llm else "n/a",
        "encoder": {"model": inputs.encoder, "fingerprint": inputs.fingerprint},
        "positive": str(config.positive),
        "negatives_per_anchor": config.negatives_per_anchor,
        "relative_margin": config.relative_margin,
        "splits": splits,
        "kept": kept,
        "per_class": per_class,
        "confused_classes": {k: v for k, v in list(mining.get("train", {}).get("confused", {}).items())},
        "noise": {
            "ads": len(noise),
            "by_split": {str(k): int(v) for k, v in noise["split"].value_counts().items()},
            # the strongest cases, for the report; noise.csv has them all
            "top": [
                {k: (str(v)[:140] if k == "text" else v) for k, v in row.items()}
                for row in noise.head(15).to_dict(orient="records")
            ],
        },
        "warning": warning,
    }
    if verdicts.calls is not None:
        calls: CallStats = verdicts.calls
        tokens = calls.prompt_tokens + calls.completion_tokens + calls.cached_prompt_tokens
        tokens += calls.cached_completion_tokens
        out["llm"] = {
            "model": config.llm.model,
            "mode": str(config.llm.mode),
            "base_url": config.llm.base_url or "https://api.openai.com/v1",
            **calls.as_dict(),
            "tokens_all_calls": tokens,
            "tokens_per_kept_triplet": round(tokens / kept, 1) if kept else None,
            "note": _model_note(config.llm.model),
        }
    return out


def _share(values: pd.Series) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def _model_note(model: str) -> str | None:
    if "smollm" in model.lower() or "135m" in model.lower():
        return "a 135M-parameter model: its verdicts prove the plumbing, they are not useful judgments"
    return None


def report_md(r: dict[str, Any]) -> str:
    """The judge report as Markdown."""
    lines = [
        "# Triplets",
        "",
        f"Judge: **{r['judge']}**; positives: {r['positive']}; up to {r['negatives_per_anchor']} negatives per anchor "
        f"below {r['relative_margin']:.0%} of the anchor's nearest same-class similarity; "
        f"encoder {r['encoder']['model']} ({r['encoder']['fingerprint'][:8]}).",
    ]
    if r["judge_kind"] == "model":
        lines.append(
            "Offline judge: confident learning (cleanlab) on out-of-fold probabilities of logistic regression on "
            "the frozen embeddings and TF-IDF; no LLM was called."
        )
    if r.get("warning"):
        lines += ["", f"**Warning:** {r['warning']}"]
    llm_info = r.get("llm")
    if llm_info and llm_info.get("note"):
        lines += ["", f"**Note:** {llm_info['note']}."]
    lines += [
        "",
        "| split | anchors | candidates | kept | kept % | positive same | negative different | anchor label agreed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split, s in r["splits"].items():
        a = s["agreement"]
        share = s["kept"] / s["candidates"] if s["candidates"] else 0
        lines.append(
            f"| {split} | {s['anchors_used']} | {s['candidates']} | {s['kept']} | {share:.0%} "
            f"| {_pct(a['positive_same'])} | {_pct(a['negative_different'])} | {_pct(a['anchor_label'])} |"
        )
    rejected = ", ".join(f"{k} {v}" for k, v in r["splits"]["train"]["reasons"].items() if k != "ok")
    lines += ["", f"Rejected, by reason (train): {rejected or 'none'}."]
    if llm_info:
        lines += [
            "",
            "## Calls",
            "",
            f"{llm_info['model']} ({llm_info['mode']}) at {llm_info['base_url']}: {llm_info['calls']} calls, "
            f"{llm_info['cached']} from the cache, {llm_info['answered']} answered now, {llm_info['unparsable']} "
            f"unparsable, {llm_info['failed']} failed after retries ({llm_info['retries']} retries, "
            f"{llm_info['http_requests']} HTTP requests).",
            f"Tokens now: {llm_info['prompt_tokens']:,} prompt + {llm_info['completion_tokens']:,} completion, "
            f"${llm_info['cost']:.4f}; all calls {llm_info['tokens_all_calls']:,} tokens, "
            f"{llm_info['tokens_per_kept_triplet']} per kept triplet.",
        ]
    lines += [
        "",
        "## Per class (train)",
        "",
        "| class | candidates | kept | " + " | ".join(judges.REASONS[1:]) + " |",
        "|---|---:|---:|" + "---:|" * (len(judges.REASONS) - 1),
    ]
    for row in r["per_class"]:
        lines.append(
            f"| {row['label']} | {row['candidates']} | {row['kept']} | "
            + " | ".join(str(row[k]) for k in judges.REASONS[1:])
            + " |"
        )
    lines += [
        "",
        "## Label noise",
        "",
        f"{r['noise']['ads']} ads are probably in the wrong class (noise.csv: id, label, the class the judge "
        "suggests, evidence).",
    ]
    if r["noise"]["top"]:
        lines += ["", "| split | id | label | suggested | evidence | text |", "|---|---|---|---|---:|---|"]
        for row in r["noise"]["top"]:
            text = str(row["text"]).replace("|", "/")
            lines.append(
                f"| {row['split']} | {row['id']} | {row['label']} | {row['suggested']} | {row['evidence']} | {text} |"
            )
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
