"""The clean stage's core: one ``Cleaner`` for every backend, cached in the shared store, and
``clean_splits`` that writes the run's ``clean/`` folder.

Backends (``clean.backend``):

- ``gliner2``: extract occupation, skill and task spans (``jobembed.clean.gliner``) and rewrite them with
  the template, e.g. ``Stilling: sygeplejerske. Kompetencer: autorisation, IV-behandling. Opgaver: ...``.
  Only extracted spans and template words reach the output. An ad where nothing is found falls back to
  its rules-cleaned text (``fallback: rules``), its raw text (``raw``: warned, it can carry personal data)
  or ``""`` (``empty``); those rows are counted.
- ``rules``: the ad minus e-mail addresses, phone numbers, URLs, placeholders, addresses and paragraphs of
  application instructions, consent clauses and employer boilerplate (``jobembed.clean.rules``).
- ``none``: the ad as it is.

Every output passes a check for e-mail addresses, phone numbers, URLs and name placeholders
(``jobembed.clean.pii``) whose findings go into the cleaning report.

Extractions are cached in the shared store by (model fingerprint, schema, threshold, windows, text hash):
a re-run, or an interrupted run started again, extracts nothing twice. The template, the span cap and the
fallback apply after the cache, so changing them re-extracts nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from jobembed import encoders, ui
from jobembed.artifacts import atomic_write_text, write_json
from jobembed.clean.gliner import WINDOWS_VERSION, Extractor, ScoredSpan, load_gliner
from jobembed.clean.pii import pii_report, pii_spans
from jobembed.clean.rules import RulesCleaner
from jobembed.clean.spans import Span, dedupe_spans
from jobembed.config import default_cache_dir
from jobembed.errors import ConfigError
from jobembed.sections import CleanBackend, CleanConfig, CleanFallback
from jobembed.store import open_store

logger = logging.getLogger(__name__)

CLEAN_FORMAT = "jobembed-clean/1"
RECORD_KIND = "clean-gliner2"
# Texts extracted between two writes to the store: an interrupted run loses at most this many.
_CHECKPOINT = 256
SOURCES = ("gliner2", "rules", "raw", "empty", "none")
_ALNUM = re.compile(r"\w")


@cache
def presets() -> dict[str, dict[str, Any]]:
    """The per-language entity schemas and templates of ``jobembed/clean/presets.yaml``."""
    return yaml.safe_load((Path(__file__).parent / "presets.yaml").read_text(encoding="utf-8"))


def resolved_schema(config: CleanConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """``(entities, template)``: the config's, or its language's preset; every template placeholder checked."""
    preset = presets()[str(config.language)]
    entities = (
        [e.model_dump() for e in config.entities]
        if config.entities
        else [{"threshold": None, **e} for e in preset["entities"]]
    )
    template = list(config.template or preset["template"])
    names = {e["name"] for e in entities}
    for line in template:
        unknown = [p for p in _placeholders(line) if p not in names]
        if unknown or not _placeholders(line):
            raise ConfigError(
                f"clean.template line {line!r} "
                + (f"uses {{{unknown[0]}}}, which is not an entity type" if unknown else "has no {placeholder}"),
                expected=f"placeholders among {', '.join(sorted(names))}",
                fix="name an entity type of clean.entities in braces on every template line",
            )
    return entities, template


def _placeholders(line: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(line) if name]


def rewrite(spans: Sequence[ScoredSpan], *, template: Sequence[str], max_spans_per_type: int) -> str:
    """The template filled with each type's spans (de-duplicated, best ``max_spans_per_type``, in reading
    order, joined by ", "); lines whose types found nothing are left out."""
    by_label: dict[str, list[ScoredSpan]] = {}
    for s in spans:
        by_label.setdefault(s.label, []).append(s)
    filled: dict[str, str] = {}
    for label, items in by_label.items():
        kept = {(s.start, s.end) for s in dedupe_spans([Span(s.start, s.end, s.label, s.text) for s in items])}
        best = sorted((s for s in items if (s.start, s.end) in kept), key=lambda s: -s.score)[:max_spans_per_type]
        words = dict.fromkeys(" ".join(s.text.split()) for s in sorted(best, key=lambda s: s.start))
        filled[label] = ", ".join(words)
    lines = []
    for line in template:
        names = _placeholders(line)
        if all(filled.get(n) for n in names):
            lines.append(line.format(**{n: filled[n] for n in names}))
    return " ".join(lines)


def _overlaps(span: ScoredSpan, ranges: list[tuple[int, int]]) -> bool:
    return any(span.start < end and start < span.end for start, end in ranges)


def _recommended_threshold(resolved: encoders.ResolvedModel) -> float | None:
    """The threshold ``clean train`` chose on held-out documents, from the extractor's sidecar (local folders)."""
    sidecar = Path(resolved.location) / "jobembed-extractor.json"
    if resolved.kind != "local" or not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8")).get("threshold")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) and 0 < value < 1 else None


@dataclass
class CleanResult:
    """What ``Cleaner.clean`` returns for n texts: the cleaned texts, where each came from
    (``SOURCES``), and the spans found (gliner2 only, else empty lists)."""

    texts: list[str]
    source: list[str]
    spans: list[list[ScoredSpan]]
    stats: dict[str, Any] = field(default_factory=dict)


class Cleaner:
    """Clean texts with one backend; the model (gliner2) loads only when the cache misses.

    Args:
        config: the ``clean`` section.
    """

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self.backend = CleanBackend(config.backend)
        self.rules = RulesCleaner(language=str(config.language))
        self.entities, self.template = resolved_schema(config)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.model_ref: str | None = None
        self.model_fingerprint: str | None = None
        self._extractor: Extractor | None = None
        self.threshold = config.threshold or 0.5
        if self.backend is CleanBackend.gliner2:
            resolved = encoders.resolve(config.model, cache_dir=self.cache_dir)
            self.model_ref = resolved.ref
            self.model_fingerprint = encoders.fingerprint_of(resolved)
            if config.threshold is None:
                self.threshold = _recommended_threshold(resolved) or 0.5

    # ------------------------------------------------------------------------------ identity

    def info(self) -> dict[str, Any]:
        """What the output depends on: for stage keys, the clean report and a bundle's cleaner."""
        out: dict[str, Any] = {"backend": str(self.backend), "format": CLEAN_FORMAT}
        if self.backend is CleanBackend.none:
            return out
        out |= {"language": str(self.config.language), "rules_fingerprint": self.rules.fingerprint}
        if self.backend is CleanBackend.gliner2:
            out |= {
                "model": self.model_ref,
                "model_fingerprint": self.model_fingerprint,
                "entities": self.entities,
                "template": self.template,
                "threshold": self.threshold,
                "max_spans_per_type": self.config.max_spans_per_type,
                "window_tokens": self.config.window_tokens,
                "window_overlap": self.config.window_overlap,
                "fallback": str(self.config.fallback),
            }
        return out

    def _extraction_key(self) -> str:
        c = self.config
        payload = [
            self.model_fingerprint,
            self.entities,
            self.threshold,
            c.window_tokens,
            c.window_overlap,
            WINDOWS_VERSION,
        ]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    # ------------------------------------------------------------------------------ work

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            device = encoders.pick_device(self.config.device)
            model, _ = load_gliner(self.config.model, cache_dir=self.cache_dir, device=device)
            precision = encoders.resolve_precision(str(self.config.precision), device)
            if precision == "fp16":
                model.half()
            elif precision == "bf16":
                import torch

                model.to(torch.bfloat16)
            self._extractor = Extractor(
                model,
                entities=self.entities,
                threshold=self.threshold,
                window_tokens=self.config.window_tokens,
                window_overlap=self.config.window_overlap,
                batch_size=self.config.batch_size,
            )
        return self._extractor

    def extract(self, texts: Sequence[str], *, progress: bool = False) -> tuple[list[list[ScoredSpan]], dict]:
        """Spans for every text, from the store where known; the rest extracted and stored in checkpoints."""
        store = open_store(self.cache_dir)
        prefix = self._extraction_key()
        keys = [f"{prefix}:{hashlib.sha1(t.encode('utf-8')).hexdigest()}" for t in texts]
        unique = dict(zip(keys, texts, strict=True))
        found = store.get_records(RECORD_KIND, list(unique))
        missing = [k for k in unique if k not in found]
        # Longest first, so each checkpoint's windows are of similar length and batches pad little.
        missing.sort(key=lambda k: -len(unique[k]))
        started = time.perf_counter()
        with ui.bar(enabled=progress) as bar:
            task = bar.add_task("extracting spans (gliner2)", total=len(missing))
            for start in range(0, len(missing), _CHECKPOINT):
                chunk = missing[start : start + _CHECKPOINT]
                spans = self.extractor.extract([unique[k] for k in chunk])
                fresh = {
                    k: [[s.start, s.end, s.label, s.score] for s in doc] for k, doc in zip(chunk, spans, strict=True)
                }
                store.put_records(RECORD_KIND, fresh)
                found.update(fresh)
                bar.advance(task, len(chunk))
        seconds = time.perf_counter() - started
        out = [
            [ScoredSpan(s, e, label, text[s:e], score) for s, e, label, score in found[k]]
            for k, text in zip(keys, texts, strict=True)
        ]
        stats = {"unique_texts": len(unique), "cached": len(unique) - len(missing), "extracted": len(missing)}
        if missing:
            stats |= {"extract_seconds": round(seconds, 2), "texts_per_second": round(len(missing) / seconds, 2)}
            if self._extractor is not None:
                stats |= {"windows": self._extractor.n_windows, "skipped_long_words": self._extractor.n_skipped_words}
        return out, stats

    def clean(self, texts: Sequence[str], *, progress: bool = False) -> CleanResult:
        """Clean n texts. Returns the n cleaned texts, their sources and (gliner2) spans, in input order."""
        texts = [str(t) for t in texts]
        if self.backend is CleanBackend.none:
            return CleanResult(list(texts), ["none"] * len(texts), [[] for _ in texts])
        ruled = self.rules.clean_many(texts)
        if self.backend is CleanBackend.rules:
            return CleanResult(ruled, ["rules" if r else "empty" for r in ruled], [[] for _ in texts])
        spans, stats = self.extract(texts, progress=progress)
        out, source = [], []
        fallback = CleanFallback(self.config.fallback)
        stats["pii_spans_dropped"] = 0
        for text, ruled_text, doc in zip(texts, ruled, spans, strict=True):
            # A span is only as clean as the model: one that overlaps an e-mail address, a phone number, a URL or a
            # placeholder *in the ad* is dropped (and counted), so personal data cannot reach the output through
            # a span, not even as pieces of a phone number in three spans.
            private = pii_spans(text) if doc else []
            usable = [s for s in doc if _ALNUM.search(s.text) and not _overlaps(s, private)]
            stats["pii_spans_dropped"] += sum(1 for s in doc if _overlaps(s, private))
            rewritten = rewrite(usable, template=self.template, max_spans_per_type=self.config.max_spans_per_type)
            if rewritten:
                out.append(rewritten)
                source.append("gliner2")
            elif fallback is CleanFallback.rules and ruled_text:
                out.append(ruled_text)
                source.append("rules")
            elif fallback is CleanFallback.raw:
                out.append(text)
                source.append("raw")
            else:
                out.append("")
                source.append("empty")
        return CleanResult(out, source, spans, stats)


# ----------------------------------------------------------------------------------------- stage


def clean_splits(
    *,
    splits: dict[str, pd.DataFrame],
    config: CleanConfig,
    out_dir: Path,
    text_column: str = "text",
    progress: bool = False,
) -> dict[str, Any]:
    """Clean every split and write ``out_dir``: ``{split}.parquet`` (``id, clean_text, clean_source,
    spans``: JSON ``[[start, end, label, score], ...]`` into the ad) and the cleaning report.

    Args:
        splits: ``{"train", "val", "test"}`` frames with ``id`` and ``text_column`` (prepare's splits).
        config: the ``clean`` section.
        out_dir: the run's ``clean/`` folder; prepare's files are never rewritten.

    Returns:
        The report's JSON (also written as ``report.json`` beside ``report.md``).
    """
    cleaner = Cleaner(config)
    if cleaner.backend is not CleanBackend.none and config.fallback == CleanFallback.raw:
        logger.warning("clean.fallback is raw: ads where nothing is extracted keep their raw text and personal data")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, CleanResult] = {}
    for name, frame in splits.items():
        result = cleaner.clean(frame[text_column].astype(str).tolist(), progress=progress)
        results[name] = result
        table = pd.DataFrame(
            {
                "id": frame["id"].astype(str).to_numpy(),
                "clean_text": result.texts,
                "clean_source": result.source,
                "spans": [json.dumps([[s.start, s.end, s.label, round(s.score, 4)] for s in d]) for d in result.spans],
            }
        )
        tmp = out_dir / f".{name}.parquet.tmp"
        table.to_parquet(tmp, index=False)
        tmp.replace(out_dir / f"{name}.parquet")
    report = _report(cleaner, splits, results, text_column=text_column, seconds=time.perf_counter() - started)
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", _report_md(report))
    return report


def load_clean_column(clean_dir: Path, name: str, ids: pd.Series) -> pd.Series:
    """The ``clean_text`` of split ``name``, aligned with prepare's ``ids`` (checked)."""
    table = pd.read_parquet(clean_dir / f"{name}.parquet", columns=["id", "clean_text"])
    if len(table) != len(ids) or not (table["id"].to_numpy() == ids.astype(str).to_numpy()).all():
        raise ConfigError(
            f"{clean_dir}/{name}.parquet does not match the prepared split {name}",
            fix="re-run `jobembed clean run RUN` (prepare changed since)",
        )
    return table["clean_text"]


def _report(
    cleaner: Cleaner,
    splits: dict[str, pd.DataFrame],
    results: dict[str, CleanResult],
    *,
    text_column: str,
    seconds: float,
) -> dict[str, Any]:
    all_raw = [t for f in splits.values() for t in f[text_column].astype(str)]
    all_ids = [i for f in splits.values() for i in f["id"].astype(str)]
    all_out = [t for r in results.values() for t in r.texts]
    sources = pd.Series([s for r in results.values() for s in r.source]).value_counts().to_dict()
    spans_per_type: dict[str, int] = {}
    ads_with_type: dict[str, int] = {}
    for r in results.values():
        for doc in r.spans:
            for label in {s.label for s in doc}:
                ads_with_type[label] = ads_with_type.get(label, 0) + 1
            for s in doc:
                spans_per_type[s.label] = spans_per_type.get(s.label, 0) + 1
    n = max(len(all_out), 1)
    examples = []
    for i in range(0, len(all_raw), max(1, len(all_raw) // 5))[:5]:
        examples.append({"id": all_ids[i], "before": _clip(all_raw[i]), "after": _clip(all_out[i])})
    stats = [r.stats for r in results.values() if r.stats]
    return {
        "format": CLEAN_FORMAT,
        "cleaner": cleaner.info(),
        "text_column_in": text_column,
        "rows": {name: len(r.texts) for name, r in results.items()},
        "sources": {s: int(sources.get(s, 0)) for s in SOURCES if sources.get(s, 0)},
        "fallbacks": int(sum(v for k, v in sources.items() if k not in {"gliner2", "none"}))
        if cleaner.backend is CleanBackend.gliner2
        else 0,
        "empty_outputs": int(sum(1 for t in all_out if not t.strip())),
        "spans_per_type": spans_per_type,
        "ads_with_type": ads_with_type,
        "mean_chars": {"before": round(sum(map(len, all_raw)) / n, 1), "after": round(sum(map(len, all_out)) / n, 1)},
        "pii_check": pii_report(all_out, ids=all_ids),
        "extraction": {
            k: sum(s.get(k, 0) for s in stats)
            for k in ("unique_texts", "cached", "extracted", "windows", "skipped_long_words", "pii_spans_dropped")
        }
        if stats
        else {},
        "seconds": round(seconds, 2),
        "examples": examples,
    }


def _clip(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _report_md(r: dict[str, Any]) -> str:
    c = r["cleaner"]
    lines = [
        "# Cleaning report",
        "",
        f"Backend **{c['backend']}**"
        + (f", language {c['language']}" if "language" in c else "")
        + (f", model `{c['model']}` ({c['model_fingerprint']})" if c.get("model") else "")
        + f". Rows: {', '.join(f'{k} {v}' for k, v in r['rows'].items())}. Time {r['seconds']} s.",
        "",
        f"Mean characters per ad: {r['mean_chars']['before']} before, {r['mean_chars']['after']} after. "
        f"Where each output came from: {', '.join(f'{k} {v}' for k, v in r['sources'].items())}. "
        f"Empty outputs: {r['empty_outputs']}.",
    ]
    if c["backend"] == "gliner2":
        lines += [
            "",
            f"Fallbacks (nothing extracted; `{c['fallback']}` used instead): {r['fallbacks']}.",
            "",
            "| entity type | spans | ads with one or more |",
            "|---|---|---|",
            *[
                f"| {e['name']} | {r['spans_per_type'].get(e['name'], 0)} | {r['ads_with_type'].get(e['name'], 0)} |"
                for e in c["entities"]
            ],
        ]
        if r["extraction"]:
            x = r["extraction"]
            lines += ["", f"Extraction: {x['extracted']} texts extracted, {x['cached']} from the cache, "
                      f"{x.get('windows', 0)} windows; {x.get('pii_spans_dropped', 0)} extracted spans dropped "
                      "because they held personal data."]  # fmt: skip
    pii = r["pii_check"]
    lines += [
        "",
        "## Personal-data check on the output",
        "",
        f"{pii['rows_with_pii']} of {pii['rows_checked']} cleaned texts still contain an e-mail address, phone "
        f"number, URL or name placeholder"
        + (": " + ", ".join(f"{k} {v}" for k, v in pii["by_kind"].items()) if pii["rows_with_pii"] else "."),
    ]
    for ex in pii.get("examples", []):
        lines.append(f"- `{ex['id']}` {ex['kind']}: `{ex['match']}`")
    lines += ["", "## Before and after", ""]
    for ex in r["examples"]:
        lines += [f"**{ex['id']}**", "", f"- before: {ex['before']}", f"- after: {ex['after']}", ""]
    return "\n".join(lines).rstrip() + "\n"
