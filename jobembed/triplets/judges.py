"""The judges: every one turns the same candidate frame into the same verdict columns.

``VERDICT_COLUMNS`` (one value per candidate row):

- ``positive_ok``: the positive is the anchor's occupation (for a category positive: the anchor belongs to it).
- ``negative_ok``: the negative is a different occupation (not a false negative).
- ``keep``: the triplet goes to training.
- ``reason``: ``ok`` or why it was rejected, one of ``REASONS``.
- ``anchor_suggested``: the category the judge puts the anchor in, when it is not the anchor's label.
- ``judge_note``: the judge's own words (LLM) or its evidence (model probabilities).
- ``judge``: which judge, e.g. ``llm:gpt-4o-mini/listwise``, ``model:cleanlab``, ``none``.

Judges:

- ``none``: every mined triplet is kept.
- ``model``: confident learning on out-of-fold predicted probabilities (``cleanlab``). Logistic regression on
  the frozen embeddings, averaged with TF-IDF + LR's, gives every training ad probabilities from a model that
  never saw it (k-fold; validation ads from a model fit on the whole training split). ``cleanlab`` flags the
  ads whose label is probably wrong; a triplet is rejected when its anchor or its positive is flagged, or when
  its negative is confidently the anchor's class (its probability of that class is above the class's
  confident-learning threshold: the mean probability the class's own ads get).
- ``llm``: see ``jobembed.triplets.llm``; keeps a triplet when the positive is judged the same occupation and
  the negative a different one. Whether the anchor's own label is right goes to the label-noise report, not
  into ``keep``: a triplet teaches similarity, and a mislabelled anchor with a true positive and a true
  negative is still a true triplet.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from jobembed.baselines import embedding_logreg, tfidf_logreg
from jobembed.sections import JudgeMode, LLMConfig, TfidfConfig
from jobembed.store import Store
from jobembed.triplets import llm
from jobembed.triplets.client import Call, CallStats, call_key, run_calls
from jobembed.triplets.mine import LABEL_PREFIX

VERDICT_COLUMNS = ["positive_ok", "negative_ok", "keep", "reason", "anchor_suggested", "judge_note", "judge"]
REASONS = (
    "ok",
    "anchor_mislabelled",
    "positive_mislabelled",
    "positive_not_same",
    "false_negative",
    "negative_unclear",
    "no_verdict",
)
NOISE_COLUMNS = ["split", "id", "label", "suggested", "evidence", "note"]


@dataclass
class Verdicts:
    """A judge's output: ``frame`` (``VERDICT_COLUMNS``, aligned with the candidates), the label-noise rows and,
    for the LLM, its call statistics."""

    frame: pd.DataFrame
    noise: pd.DataFrame
    calls: CallStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _frame(n: int, judge: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "positive_ok": np.ones(n, dtype=bool),
            "negative_ok": np.ones(n, dtype=bool),
            "keep": np.ones(n, dtype=bool),
            "reason": ["ok"] * n,
            "anchor_suggested": [""] * n,
            "judge_note": [""] * n,
            "judge": [judge] * n,
        }
    )


def judge_none(candidates: pd.DataFrame) -> Verdicts:
    """Keep every mined triplet."""
    return Verdicts(_frame(len(candidates), "none"), pd.DataFrame(columns=NOISE_COLUMNS))


# ------------------------------------------------------------------------------------------ the model judge


@dataclass
class LabelModel:
    """Out-of-fold class probabilities for one pool of ads, and cleanlab's verdict on each label.

    Attributes:
        classes: the column order of ``probs``.
        probs: n x k probabilities from models that never saw the ad.
        flagged: n booleans, True where cleanlab finds the label probably wrong.
        thresholds: per class, the confident-learning threshold (mean probability of the class on its own ads).
    """

    ids: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    probs: np.ndarray
    flagged: np.ndarray
    thresholds: np.ndarray

    def row(self) -> dict[str, int]:
        return {str(i): n for n, i in enumerate(self.ids)}

    def suggested(self) -> np.ndarray:
        return self.classes[self.probs.argmax(axis=1)]


def out_of_fold_probs(
    *,
    train_vectors: np.ndarray,
    train_texts: list[str],
    train_labels: np.ndarray,
    others: list[tuple[np.ndarray, list[str]]],
    tfidf: bool,
    folds: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(classes, train_probs, [other_probs...])``: k-fold probabilities on train, a full-train fit for the rest.

    Logistic regression on the embeddings, averaged with TF-IDF + LR on the texts when ``tfidf``. The folds keep
    each repost group (``groups``, prepare's ``group`` column; None: every ad its own) on one side: a label error
    repeated across reposts would otherwise be predicted from its own copy and never flagged.
    """
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    def unit(x: np.ndarray) -> np.ndarray:  # embedding_logreg's C is set for unit-norm vectors
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if len(x) else x

    train_vectors, others = (
        unit(np.asarray(train_vectors, dtype=np.float64)),
        [(unit(np.asarray(v, dtype=np.float64)), t) for v, t in others],
    )
    classes = np.unique(train_labels)
    smallest = int(pd.Series(train_labels).value_counts().min())
    groups = np.arange(len(train_labels)) if groups is None else pd.factorize(np.asarray(groups))[0]
    n_splits = max(2, min(folds, max(smallest, 2), len(np.unique(groups))))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    views: list[tuple[Any, Any, list[Any]]] = [(embedding_logreg(seed=seed), train_vectors, [v for v, _ in others])]
    if tfidf:
        views.append(
            (
                tfidf_logreg(TfidfConfig(), seed=seed),
                np.asarray(train_texts, dtype=object),
                [np.asarray(t, dtype=object) for _, t in others],
            )
        )
    jobs = max(1, min(cv.n_splits, os.cpu_count() or 1))
    train_probs = np.zeros((len(train_labels), len(classes)))
    other_probs = [np.zeros((len(v), len(classes))) for v, _ in others]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the least populated class has only n members", convergence notes
        for model, X, X_others in views:
            train_probs += cross_val_predict(
                model, X, train_labels, groups=groups, cv=cv, method="predict_proba", n_jobs=jobs
            )
            if any(len(x) for x in X_others):
                fitted = model.fit(X, train_labels)
                for i, x in enumerate(X_others):
                    if len(x):
                        other_probs[i] += fitted.predict_proba(x)
    return classes, train_probs / len(views), [p / len(views) for p in other_probs]


def label_model(
    ids: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None = None,
    *,
    noise_filter: str = "prune_by_noise_rate",
) -> LabelModel:
    """cleanlab's label issues for one pool (``filter_by=noise_filter``); ``thresholds`` from the training pool for
    the others."""
    from cleanlab.count import get_confident_thresholds
    from cleanlab.filter import find_label_issues

    index = {c: i for i, c in enumerate(classes)}
    known = np.array([label in index for label in labels], dtype=bool)
    y = np.array([index.get(label, 0) for label in labels])
    flagged = np.zeros(len(labels), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if thresholds is None:
            thresholds = get_confident_thresholds(y, probs, multi_label=False)
        if known.sum() >= 2 and len(np.unique(y[known])) >= 2:
            # Columns of classes missing from this pool (small validation splits) would break cleanlab's counts.
            present = np.unique(y[known])
            sub = probs[known][:, present]
            sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
            remap = {c: i for i, c in enumerate(present)}
            issues = find_label_issues(
                labels=np.array([remap[v] for v in y[known]]), pred_probs=sub, filter_by=str(noise_filter)
            )
            flagged[np.flatnonzero(known)] = issues
    return LabelModel(np.asarray(ids).astype(str), np.asarray(labels).astype(str), classes, probs, flagged, thresholds)


def judge_model(candidates: pd.DataFrame, *, models: dict[str, LabelModel]) -> Verdicts:
    """Verdicts from label models; ``candidates`` has a ``split`` column naming the pool of each row."""
    out = _frame(len(candidates), "model:cleanlab")
    positive_ok, negative_ok, keep = (out[c].to_numpy().copy() for c in ("positive_ok", "negative_ok", "keep"))
    reasons, suggested_col, notes = list(out["reason"]), list(out["anchor_suggested"]), list(out["judge_note"])
    rows = {split: m.row() for split, m in models.items()}
    suggestions_of = {split: m.suggested() for split, m in models.items()}
    columns = {split: {c: i for i, c in enumerate(m.classes)} for split, m in models.items()}
    for n, cand in enumerate(candidates.itertuples(index=False)):
        m, col, sugg = models[cand.split], columns[cand.split], suggestions_of[cand.split]
        a = rows[cand.split][cand.anchor_id]
        neg = rows[cand.split][cand.negative_id]
        anchor_bad = bool(m.flagged[a])
        if cand.positive_id.startswith(LABEL_PREFIX):
            pos_bad = anchor_bad
        else:
            pos_bad = bool(m.flagged[rows[cand.split][cand.positive_id]])
        k = col.get(cand.anchor_label)
        p_neg = float(m.probs[neg, k]) if k is not None else 0.0
        confident = k is not None and p_neg >= m.thresholds[k]
        neg_bad = bool(confident or (m.flagged[neg] and sugg[neg] == cand.anchor_label))
        positive_ok[n], negative_ok[n] = not pos_bad, not neg_bad
        keep[n] = not (anchor_bad or pos_bad or neg_bad)
        if anchor_bad:
            suggested_col[n] = str(m.classes[m.probs[a].argmax()])
        reasons[n] = (
            "anchor_mislabelled"
            if anchor_bad
            else "positive_mislabelled"
            if pos_bad
            else "false_negative"
            if neg_bad
            else "ok"
        )
        p_anchor = float(m.probs[a, k]) if k is not None else 0.0
        notes[n] = f"p(anchor in {cand.anchor_label})={p_anchor:.2f}; p(negative in {cand.anchor_label})={p_neg:.2f}"
    out["positive_ok"], out["negative_ok"], out["keep"] = positive_ok, negative_ok, keep
    out["reason"], out["anchor_suggested"], out["judge_note"] = reasons, suggested_col, notes
    noise = []
    for split, m in models.items():
        suggestions, col = suggestions_of[split], columns[split]
        for i in np.flatnonzero(m.flagged):
            k = col.get(m.labels[i])
            p_given = float(m.probs[i, k]) if k is not None else 0.0
            noise.append(
                {
                    "split": split,
                    "id": m.ids[i],
                    "label": m.labels[i],
                    "suggested": str(suggestions[i]),
                    "evidence": round(float(m.probs[i].max()) - p_given, 4),
                    "note": f"p(label)={p_given:.2f}, p(suggested)={float(m.probs[i].max()):.2f}",
                }
            )
    frame = pd.DataFrame(noise, columns=NOISE_COLUMNS).sort_values("evidence", ascending=False, kind="stable")
    return Verdicts(out, frame.reset_index(drop=True))


# ------------------------------------------------------------------------------------------ the LLM judge


@dataclass
class LLMJob:
    """The calls for one candidate frame and how each reply maps back to its rows."""

    calls: list[Call]
    rows: list[list[int]]  # per call: candidate row numbers it judges
    orders: list[list[int]]  # listwise: per call, the candidate slot of each row's negative / positive
    positive_slot: list[int | None]
    mode: JudgeMode
    codes: list[str]


def llm_job(
    candidates: pd.DataFrame,
    *,
    texts: dict[str, str],
    categories: list[llm.Category],
    config: LLMConfig,
    seed: int,
) -> LLMJob:
    """Build the calls (pure: nothing is sent). ``texts`` maps ad ids and ``label:<code>`` to what the judge reads."""
    mode = JudgeMode(config.mode)
    codes = [c.code for c in categories]
    calls, rows, orders, positive_slot = [], [], [], []

    def body(messages: list[dict[str, str]], schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": config.model,
            "messages": messages,
            "response_format": llm.response_format(schema),
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }

    if mode is JudgeMode.pointwise:
        schema = llm.schema(mode, codes=codes)
        for n, c in enumerate(candidates.itertuples(index=False)):
            item = {
                "anchor": texts[c.anchor_id],
                "anchor_label": c.anchor_label,
                "positive": texts[c.positive_id],
                "positive_is_label": c.positive_id.startswith(LABEL_PREFIX),
                "negative": texts[c.negative_id],
            }
            b = body(llm.build_messages(item, mode=mode, categories=categories, max_chars=config.max_ad_chars), schema)
            calls.append(Call(call_key(b), b, _parser(mode, codes, 0)))
            rows.append([n])
            orders.append([])
            positive_slot.append(None)
        return LLMJob(calls, rows, orders, positive_slot, mode, codes)
    rng = np.random.default_rng(seed)
    for _, group in candidates.groupby(["split", "slot"], sort=False):
        first = group.iloc[0]
        members = [str(first.positive_id)] if not str(first.positive_id).startswith(LABEL_PREFIX) else []
        members += [str(x) for x in group["negative_id"]]
        order = rng.permutation(len(members)).tolist()  # candidate number i shows members[order[i]]
        shown = [members[j] for j in order]
        where = {j: i for i, j in enumerate(order)}
        item = {
            "anchor": texts[str(first.anchor_id)],
            "anchor_label": first.anchor_label,
            "candidates": [texts[m] for m in shown],
        }
        schema = llm.schema(mode, codes=codes, n_candidates=len(shown))
        b = body(llm.build_messages(item, mode=mode, categories=categories, max_chars=config.max_ad_chars), schema)
        calls.append(Call(call_key(b), b, _parser(mode, codes, len(shown))))
        rows.append(group.index.tolist())
        offset = 1 if members and len(members) > len(group) else 0
        orders.append([where[offset + r] for r in range(len(group))])
        positive_slot.append(where[0] if offset else None)
    return LLMJob(calls, rows, orders, positive_slot, mode, codes)


def _parser(mode: JudgeMode, codes: list[str], n: int):
    def parse(text: str) -> dict[str, Any]:
        return llm.parse_response(text, mode=mode, codes=codes, n_candidates=n)

    return parse


def judge_llm(
    candidates: pd.DataFrame, *, job: LLMJob, config: LLMConfig, store: Store, progress: bool = True
) -> Verdicts:
    """Send ``job``'s calls (cached ones are free) and map the replies onto the candidate rows."""
    parsed, stats = run_calls(job.calls, config=config, store=store, progress=progress)
    out = _frame(len(candidates), f"llm:{config.model}/{job.mode}")
    positive_ok, negative_ok, keep = (out[c].to_numpy().copy() for c in ("positive_ok", "negative_ok", "keep"))
    reasons, suggested, notes = list(out["reason"]), list(out["anchor_suggested"]), list(out["judge_note"])
    anchor_votes: dict[tuple[str, str, str], Counter] = {}
    labels = candidates["anchor_label"].astype(str).to_numpy()
    for call, rows, order, pos in zip(job.calls, job.rows, job.orders, job.positive_slot, strict=True):
        verdict = parsed.get(call.key)
        for r, n in enumerate(rows):
            if verdict is None:
                positive_ok[n] = negative_ok[n] = keep[n] = False
                reasons[n] = "no_verdict"
                continue
            category = verdict["anchor_category"]
            if job.mode is JudgeMode.pointwise:
                p_ok, n_ok = verdict["positive_same_occupation"], verdict["negative_different_occupation"]
                unclear = False
            else:
                same, different = set(verdict["same_occupation"]), set(verdict["different_occupation"])
                p_ok = (pos in same) if pos is not None else category in (None, labels[n])
                n_ok = order[r] in different and order[r] not in same
                unclear = order[r] not in different and order[r] not in same
            positive_ok[n], negative_ok[n], keep[n] = p_ok, n_ok, p_ok and n_ok
            reasons[n] = (
                "positive_not_same"
                if not p_ok
                else "negative_unclear"
                if unclear
                else "false_negative"
                if not n_ok
                else "ok"
            )
            if category is not None and category != labels[n]:
                suggested[n] = category
            notes[n] = verdict["reason"]
        if verdict is not None and rows:
            first = candidates.iloc[rows[0]]
            key = (str(first.get("split", "")), str(first.anchor_id), str(first.anchor_label))
            anchor_votes.setdefault(key, Counter())[verdict["anchor_category"] or first.anchor_label] += 1
    out["positive_ok"], out["negative_ok"], out["keep"] = positive_ok, negative_ok, keep
    out["reason"], out["anchor_suggested"], out["judge_note"] = reasons, suggested, notes
    noise = []
    for (split, anchor_id, label), votes in anchor_votes.items():
        best, count = votes.most_common(1)[0]
        if best != label:
            noise.append(
                {
                    "split": split,
                    "id": anchor_id,
                    "label": label,
                    "suggested": best,
                    "evidence": round(count / sum(votes.values()), 3),
                    "note": f"{count} of {sum(votes.values())} calls put the anchor in {best}",
                }
            )
    frame = pd.DataFrame(noise, columns=NOISE_COLUMNS).sort_values("evidence", ascending=False, kind="stable")
    return Verdicts(out, frame.reset_index(drop=True), calls=stats)
