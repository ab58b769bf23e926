"""``jobembed clean eval``: how well a cleaner finds the gold spans of a JSONL file.

- ``gliner2``: span precision, recall and F1 per type, exact (same start, end and type) and overlap
  (any shared character, one-to-one), after mapping the gold labels onto the extractor's types
  (``--label-map skill=kompetence``, as in ``clean train``).
- ``rules``: extracts nothing, so it has no span F1. What it can get wrong is deleting job content, so
  it reports the share of gold spans whose text survives cleaning verbatim (per type) and the share of
  the output's characters that lie inside gold spans (how much of what it keeps is skill text).

Data contract: the gold file has one ``{"id", "text", "spans": [{"start", "end", "label", "text"}]}`` per
line (``jobembed.clean.spans.read_gold_jsonl``); the result is JSON-able.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobembed.clean.core import Cleaner
from jobembed.clean.spans import GoldDoc, Span, read_gold_jsonl, span_scores
from jobembed.errors import ConfigError
from jobembed.sections import CleanBackend, CleanConfig


def evaluate_cleaner(
    *, gold_path: Path, config: CleanConfig, label_map: Mapping[str, str] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Score ``config``'s cleaner on the gold file.

    Args:
        gold_path: JSONL of gold documents.
        config: the ``clean`` section (backend, model, schema).
        label_map: gold label -> extractor entity type (as in ``clean train``), e.g. ``{"skill": "kompetence",
            "knowledge": "kompetence"}``; unmapped gold labels are scored under their own name. Scores are per
            entity type; predicted types with no gold spans are not scored (counted as ignored predictions).

    Returns:
        ``{"backend", "docs", "gold_spans", "seconds", ...}`` plus ``scores`` (gliner2: ``span_scores``
        output) or ``survival`` (rules).
    """
    docs = read_gold_jsonl(gold_path)
    if config.backend == CleanBackend.none:
        raise ConfigError("clean eval needs a backend that changes the text", fix="pass --backend gliner2 or rules")
    cleaner = Cleaner(config)
    texts = [d.text for d in docs]
    gold_labels = sorted({s.label for d in docs for s in d.spans})
    started = time.perf_counter()
    out: dict[str, Any] = {
        "gold": str(gold_path),
        "backend": str(config.backend),
        "cleaner": cleaner.info(),
        "docs": len(docs),
        "gold_spans": {lb: sum(s.label == lb for d in docs for s in d.spans) for lb in gold_labels},
    }
    if config.backend == CleanBackend.gliner2:
        spans, _ = cleaner.extract(texts, progress=progress)
        mapping = dict(label_map or {})
        gold = [[Span(s.start, s.end, mapping.get(s.label, s.label), s.text) for s in d.spans] for d in docs]
        pred = [[Span(s.start, s.end, s.label, s.text) for s in doc] for doc in spans]
        out["label_map"] = mapping
        out["threshold"] = cleaner.threshold
        out["scores"] = span_scores(gold, pred, labels=sorted({s.label for d in gold for s in d}))
        out["predicted_spans"] = sum(len(p) for p in pred)
    else:
        cleaned = cleaner.rules.clean_many(texts)
        out["survival"] = _survival(docs, cleaned, gold_labels)
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def _survival(docs: list[GoldDoc], cleaned: list[str], labels: list[str]) -> dict[str, Any]:
    kept = {lb: [0, 0] for lb in labels}
    gold_chars = out_chars = 0
    for doc, text in zip(docs, cleaned, strict=True):
        squashed = " ".join(text.split())
        for s in doc.spans:
            kept[s.label][1] += 1
            kept[s.label][0] += " ".join(s.text.split()) in squashed
        out_chars += len(squashed)
        # Characters of the output inside gold spans: each surviving span counted once.
        gold_chars += sum(len(" ".join(s.text.split())) for s in doc.spans if " ".join(s.text.split()) in squashed)
    return {
        "span_text_kept": {lb: round(k / n, 4) if n else None for lb, (k, n) in kept.items()},
        "span_text_kept_all": round(sum(k for k, _ in kept.values()) / max(1, sum(n for _, n in kept.values())), 4),
        "output_chars_in_gold_spans": round(gold_chars / max(1, out_chars), 4),
        "chars_before": sum(len(d.text) for d in docs),
        "chars_after": sum(len(t) for t in cleaned),
    }


def eval_markdown(result: dict[str, Any]) -> str:
    """A short Markdown table of ``evaluate_cleaner``'s result."""
    lines = [f"# clean eval: {result['backend']} on {result['gold']} ({result['docs']} documents)", ""]
    if "scores" in result:
        lines += ["| type | match | precision | recall | F1 | support |", "|---|---|---|---|---|---|"]
        for match in ("exact", "overlap"):
            block = result["scores"][match]
            for label, m in {**block["per_label"], "micro": block["micro"]}.items():
                lines.append(
                    f"| {label} | {match} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                )
    else:
        s = result["survival"]
        lines += [
            "Rules extract nothing (no span F1); share of gold span texts that survive cleaning verbatim:",
            "",
            *[f"- {lb}: {v}" for lb, v in s["span_text_kept"].items()],
            f"- all: {s['span_text_kept_all']}",
            "",
            f"Share of the output's characters inside gold spans: {s['output_chars_in_gold_spans']} "
            f"({s['chars_before']} characters before, {s['chars_after']} after).",
        ]
    return "\n".join(lines) + "\n"
