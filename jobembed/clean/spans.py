"""Span evaluation for ``jobembed clean eval``: read gold span files and score predicted spans against them.

Data contract (JSON Lines, one document per line, as in ``../shared/data/da-kompetencer/*.jsonl``)::

    {"id": "doc-1", "text": "Du har erfaring med Python.", "spans": [
        {"start": 20, "end": 26, "label": "skill", "text": "Python"}]}

- ``id``: optional string (default ``"line-<n>"``); ``text``: string; ``spans``: list (may be empty).
- each span: integer ``start`` < ``end`` <= ``len(text)``, character offsets into ``text``; non-empty string
  ``label``; optional ``text``, which must equal ``text[start:end]`` when given. Other keys are ignored.

Scores (:func:`span_scores`), per label, micro (pooled counts) and macro (mean over labels):

- ``exact``: a prediction is a true positive when a gold span has the same ``(start, end, label)``.
- ``overlap``: a prediction is a true positive when it shares at least one character with a gold span of the same
  label. Matching is one-to-one (greedy by overlap length, then by position), so two predictions over one gold span
  are 1 tp + 1 fp and P/R stay proper precision and recall.

Predicted labels are first mapped with ``label_map`` (e.g. the extractor's ``"kompetence"`` -> ``"skill"``).
Predictions whose label is not among the scored labels after mapping are ignored: they are neither true nor false
positives (they are counted in ``"ignored_predictions"``), because an extractor asked for more labels than the
gold file has should not be punished for them. Pass ``labels`` to choose the scored labels; default the gold labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobembed.errors import DataError

MATCHES: tuple[str, ...] = ("exact", "overlap")


@dataclass(frozen=True)
class Span:
    """A labelled character span ``text[start:end]`` of a document (``text`` is the covered text, optional)."""

    start: int
    end: int
    label: str
    text: str = ""


@dataclass(frozen=True)
class GoldDoc:
    """One gold document: its id, text and spans."""

    id: str
    text: str
    spans: tuple[Span, ...]


def read_gold_jsonl(path: Path) -> list[GoldDoc]:
    """Read and validate a gold span file (see the module docstring for the format).

    Args:
        path: a ``.jsonl`` file.

    Returns:
        The documents in file order (blank lines are skipped).

    Raises:
        DataError: missing file, or a line that is not valid JSON or breaks the contract; the message names the
            file, the line number, the field and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "gold span file not found", where=str(path), fix="pass a JSONL file with id, text and spans per line"
        )
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                docs.append(_parse_line(line, where=f"{path}:{n}", n=n))
    return docs


def _parse_line(line: str, *, where: str, n: int) -> GoldDoc:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"not valid JSON ({e.msg} at column {e.colno})", where=where, fix="write one JSON object per line"
        ) from e
    if not isinstance(row, dict):
        raise DataError("expected a JSON object", where=where, found=type(row).__name__, fix="one object per line")
    text = row.get("text")
    if not isinstance(text, str):
        raise DataError(
            "field `text`", where=where, expected="a string", found=_show(text), fix="add the document text"
        )
    raw_spans = row.get("spans")
    if not isinstance(raw_spans, list):
        raise DataError(
            "field `spans`", where=where, expected="a list (may be empty)", found=_show(raw_spans), fix="add spans: []"
        )
    doc_id = row.get("id", f"line-{n}")
    spans = tuple(_parse_span(s, text, where=f"{where}: spans[{i}]") for i, s in enumerate(raw_spans))
    return GoldDoc(id=str(doc_id), text=text, spans=spans)


def _parse_span(raw: Any, text: str, *, where: str) -> Span:
    if not isinstance(raw, dict):
        raise DataError("expected a span object", where=where, found=_show(raw), fix='use {"start", "end", "label"}')
    for key in ("start", "end"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(
                f"field `{key}`", where=where, expected="an integer offset", found=_show(value), fix=f"add {key}"
            )
    start, end, label = raw["start"], raw["end"], raw.get("label")
    if not isinstance(label, str) or not label:
        raise DataError(
            "field `label`", where=where, expected="a non-empty string", found=_show(label), fix="add the label"
        )
    if not 0 <= start < end <= len(text):
        raise DataError(
            "fields `start`/`end`",
            where=where,
            expected=f"0 <= start < end <= len(text) = {len(text)}",
            found=f"start={start}, end={end}",
            fix="use character offsets into text, end exclusive",
        )
    covered = text[start:end]
    given = raw.get("text")
    if given is not None and given != covered:
        raise DataError(
            "field `text`",
            where=where,
            expected=f"text[{start}:{end}] = {covered[:40]!r}",
            found=f"{str(given)[:40]!r}",
            fix="fix the offsets (character, not byte, offsets) or the span text",
        )
    return Span(start, end, label, covered)


def _show(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {str(value)[:30]!r}"


def dedupe_spans(spans: Sequence[Span], *, text: str | None = None) -> list[Span]:
    """Drop duplicate and nested spans of the same label (e.g. an extractor's output before scoring).

    Removed: exact duplicates; spans inside a longer span of the same label; and spans whose text is the same as an
    earlier span of the same label up to case and whitespace (the first, in ``spans`` order, is kept). The covered
    text is ``text[start:end]`` when ``text`` is given, else ``span.text``.

    Returns:
        The kept spans sorted by ``(start, -end, label)``.
    """

    def covered(s: Span) -> str:
        return " ".join((text[s.start : s.end] if text is not None else s.text).split()).casefold()

    seen_text: set[tuple[str, str]] = set()
    first: list[Span] = []
    for s in spans:
        key = (s.label, covered(s))
        if key[1] and key in seen_text:
            continue
        seen_text.add(key)
        first.append(s)
    unique = sorted(set(first), key=lambda s: (s.start, -s.end, s.label))
    kept = [
        s
        for s in unique
        if not any(o.label == s.label and o.start <= s.start and s.end <= o.end and o != s for o in unique)
    ]
    return kept


def span_scores(
    gold: Sequence[Sequence[Span]],
    pred: Sequence[Sequence[Span]],
    *,
    labels: Sequence[str] | None = None,
    label_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Precision, recall and F1 of predicted spans against gold spans, exact and overlapping.

    Args:
        gold: per document, its gold spans.
        pred: per document (same order and length as ``gold``), the predicted spans.
        labels: the labels to score; default every label seen in ``gold``.
        label_map: predicted label -> gold label, applied before scoring; unmapped labels pass through.

    Returns:
        ``{"labels": [...], "documents": int, "ignored_predictions": int,
        "exact": {...}, "overlap": {...}}`` where each match type is
        ``{"per_label": {label: counts}, "micro": counts, "macro": {"precision", "recall", "f1"}}`` and ``counts``
        is ``{"precision", "recall", "f1", "tp", "fp", "fn", "support"}`` (support = number of gold spans).
        An empty denominator gives 0.0.

    Raises:
        ValueError: ``gold`` and ``pred`` have different lengths.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} documents but pred has {len(pred)}")
    mapping = dict(label_map or {})
    scored = list(labels) if labels is not None else sorted({s.label for doc in gold for s in doc})
    wanted = set(scored)
    counts = {m: {lab: [0, 0, 0] for lab in scored} for m in MATCHES}  # tp, fp, fn
    ignored = 0
    for gold_doc, pred_doc in zip(gold, pred, strict=True):
        mapped = [Span(s.start, s.end, mapping.get(s.label, s.label), s.text) for s in pred_doc]
        ignored += sum(1 for s in mapped if s.label not in wanted)
        for lab in scored:
            g = sorted({(s.start, s.end) for s in gold_doc if s.label == lab})
            p = sorted({(s.start, s.end) for s in mapped if s.label == lab})
            for m in MATCHES:
                tp = len(set(g) & set(p)) if m == "exact" else _overlap_matches(g, p)
                c = counts[m][lab]
                c[0] += tp
                c[1] += len(p) - tp
                c[2] += len(g) - tp
    out: dict[str, Any] = {"labels": scored, "documents": len(gold), "ignored_predictions": ignored}
    for m in MATCHES:
        per_label = {lab: _prf(*counts[m][lab]) for lab in scored}
        micro = _prf(*(sum(counts[m][lab][i] for lab in scored) for i in range(3)))
        macro = {
            k: (sum(per_label[lab][k] for lab in scored) / len(scored) if scored else 0.0)
            for k in ("precision", "recall", "f1")
        }
        out[m] = {"per_label": per_label, "micro": micro, "macro": macro}
    return out


def _overlap_matches(gold: list[tuple[int, int]], pred: list[tuple[int, int]]) -> int:
    """Size of a one-to-one matching of overlapping spans, greedy by overlap length (ties by position)."""
    pairs = sorted(
        ((min(ge, pe) - max(gs, ps), i, j) for i, (gs, ge) in enumerate(gold) for j, (ps, pe) in enumerate(pred)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_g: set[int] = set()
    used_p: set[int] = set()
    for size, i, j in pairs:
        if size > 0 and i not in used_g and j not in used_p:
            used_g.add(i)
            used_p.add(j)
    return len(used_g)


def _prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "support": tp + fn}
