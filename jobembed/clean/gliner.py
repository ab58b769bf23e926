"""The ``gliner2`` backend: extract occupation, skill and task spans from whole ads, in windows of the
extractor encoder's own subword tokens, batched and length-sorted.

Why windows in subword tokens: gliner2 feeds the schema prompt plus every subword of the text to the
encoder and truncates nothing, so an ad longer than the encoder's position limit (512 for e5-small) crashes
with a RuntimeError; its ``batch_extract_entities_long`` counts ``chunk_size`` in *words*, and one URL or a
Polish compound can be dozens of subwords, so it crashes too. Here every window is sized with the
extractor's own word splitter and tokenizer, windows overlap so a span cut by one edge is whole in the next,
and gliner2's ``merge_chunk_results`` maps spans back to character offsets in the ad.

Why it is fast: the original called ``extract_entities`` once per ad (16 ads/s on an H200, the Python
around the encoder being the limit). Here all windows of many ads go through ``batch_extract`` at once,
sorted by length so a batch pads to its own longest window, in half precision on a GPU.

Data contract: :meth:`Extractor.extract` takes n texts and returns n lists of ``Span`` (start, end, label,
text, score) with ``text == ad[start:end]``, sorted by start.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobembed import encoders
from jobembed.errors import ModelError, one_line

logger = logging.getLogger(__name__)

# The "." gliner2 may append to a text, and its [SEP_TEXT]: positions a window needs beyond its words.
_MARGIN = 4


@dataclass(frozen=True)
class ScoredSpan:
    """One extracted span: character offsets into the ad (end exclusive), its type and the model's score."""

    start: int
    end: int
    label: str
    text: str
    score: float


def gliner_schema(entities: Sequence[dict[str, Any]], threshold: float) -> dict[str, dict[str, Any]]:
    """``[{"name", "description", "threshold"}]`` -> gliner2's entity dict (per-type thresholds included)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entities:
        spec: dict[str, Any] = {"threshold": e.get("threshold") or threshold}
        if e.get("description"):
            spec["description"] = e["description"]
        out[e["name"]] = spec
    return out


def load_gliner(ref: str, *, cache_dir: Path | None = None, device: str = "cpu"):
    """Load a GLiNER2 model from a local folder or a (pinned) Hub id; one line on failure.

    Returns:
        ``(model, resolved)``: the model in eval mode on ``device`` (fp32) and its resolved reference.
    """
    try:
        from gliner2 import GLiNER2
    except ImportError as e:  # pragma: no cover - gliner2 is a dependency
        raise ModelError(f"the gliner2 package is not installed ({e})", fix="pip install 'gliner2==2.1.0'") from None
    resolved = encoders.resolve(ref, cache_dir=cache_dir)
    if resolved.kind == "builtin":
        raise ModelError(
            f"{ref} is a sentence encoder, not a GLiNER2 extractor",
            fix="train one from it with `jobembed clean train --encoder builtin:multilingual-e5-small`, "
            "or pass a GLiNER2 folder or Hub id (fastino/gliner2-multi-v1)",
        )
    if resolved.kind == "local" and not (Path(resolved.location) / "encoder_config").is_dir():
        raise ModelError(
            f"folder {ref} is not a GLiNER2 model",
            expected="config.json, encoder_config/ and model.safetensors (GLiNER2.save_pretrained)",
            fix="pass a folder written by `jobembed clean train` or GLiNER2.save_pretrained",
        )
    source = resolved.location
    kwargs: dict[str, Any] = {"map_location": device}
    if resolved.kind == "hub":
        kwargs["revision"] = resolved.revision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GLiNER2.from_pretrained(source, **kwargs)
    except Exception as e:
        raise ModelError(f"cannot load GLiNER2 model {ref} ({one_line(e)})", fix="check the folder or Hub id") from None
    model.eval()
    return model, resolved


def position_limit(model) -> int:
    """The largest number of positions the extractor's encoder takes (512 for BERT/e5-small)."""
    config = model.encoder.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert"}:
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    if str(getattr(config, "model_type", "")).startswith("deberta") and not getattr(
        config, "position_biased_input", True
    ):
        return 1 << 20  # relative positions only (mdeberta): no hard limit, window_tokens alone sizes windows
    return int(limit)


# Bumped when `Extractor.windows` cuts an ad differently, so cached extractions from older windows are not reused.
WINDOWS_VERSION = 2


class Extractor:
    """A GLiNER2 model and a schema, extracting spans from whole ads in subword-sized windows.

    Args:
        model: a loaded ``gliner2.GLiNER2``.
        entities: ``[{"name", "description", "threshold"}]``.
        threshold: the default span threshold.
        window_tokens: text subword tokens per window (capped by the encoder's limit minus the prompt).
        window_overlap: subword tokens shared by consecutive windows (always at least the cut word, unless it
            costs over half a window).
        batch_size: windows per forward pass.
    """

    def __init__(
        self,
        model,
        *,
        entities: Sequence[dict[str, Any]],
        threshold: float = 0.5,
        window_tokens: int = 256,
        window_overlap: int = 48,
        batch_size: int = 16,
    ) -> None:
        from gliner2 import Schema

        self.model = model
        self.labels = [e["name"] for e in entities]
        self.schema = Schema().entities(gliner_schema(entities, threshold))
        self.threshold = threshold
        self.batch_size = batch_size
        proc = model.processor
        # Positions the schema prompt and [SEP_TEXT] take before the first word of every window.
        prefix = proc.transform_record("x.", self.schema).text_word_first_positions[0]
        room = position_limit(model) - prefix - _MARGIN
        if room < 16:
            raise ModelError(
                f"the schema prompt takes {prefix} of the extractor's {position_limit(model)} positions",
                fix="shorten the entity descriptions in clean.entities",
            )
        self.budget = min(window_tokens, room)
        self.overlap = min(window_overlap, self.budget // 3)
        self._word_cost = functools.lru_cache(maxsize=200_000)(lambda w: max(1, len(proc.tokenizer.tokenize(w))))
        self.n_windows = 0
        self.n_skipped_words = 0

    def windows(self, text: str):
        """``gliner2.inference.chunking.TextChunk`` windows of ``text``, each within the subword budget."""
        from gliner2.inference.chunking import TextChunk

        words = list(self.model.processor.word_splitter(text, lower=True))
        if not words:
            return [TextChunk(text=text, start_char=0, end_char=len(text), start_word=0, end_word=0)]
        cost = [self._word_cost(w) for w, _, _ in words]
        chunks, i = [], 0
        while i < len(words):
            if cost[i] > self.budget:  # one "word" (a pasted URL or hash) longer than a window: skipped, counted
                self.n_skipped_words += 1
                i += 1
                continue
            j, used = i, 0
            while j < len(words) and used + cost[j] <= self.budget:
                used += cost[j]
                j += 1
            chunks.append(
                TextChunk(text=text[words[i][1] : words[j - 1][2]], start_char=words[i][1], end_char=words[j - 1][2],
                          start_word=i, end_word=j)
            )  # fmt: skip
            if j >= len(words):
                break
            # Step back over the last words worth `overlap` subwords, and always over at least the cut word
            # when it is no more than half a window (a URL costs more than a small overlap): without that,
            # consecutive windows would share nothing and a span cut by the edge would be lost.
            k, back = j, 0
            while k - 1 > i and (back + cost[k - 1] <= self.overlap or (k == j and cost[k - 1] <= self.budget // 2)):
                k -= 1
                back += cost[k]
            i = k
        return chunks or [TextChunk(text=text, start_char=0, end_char=len(text), start_word=0, end_word=0)]

    def extract(self, texts: Sequence[str]) -> list[list[ScoredSpan]]:
        """Spans of every ad, sorted by start; ``text == ad[start:end]`` for each."""
        import torch
        from gliner2.inference.chunking import merge_chunk_results

        per_doc = [self.windows(t) for t in texts]
        flat = [(d, c) for d, chunks in enumerate(per_doc) for c in chunks]
        self.n_windows += len(flat)
        # Longest first: each batch pads to its own longest window, and a too-big batch fails at once.
        order = sorted(range(len(flat)), key=lambda i: -(flat[i][1].end_char - flat[i][1].start_char))
        results: list[Any] = [None] * len(flat)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size * 8):
                idx = order[start : start + self.batch_size * 8]
                out = self.model.batch_extract(
                    [flat[i][1].text for i in idx],
                    self.schema,
                    batch_size=self.batch_size,
                    threshold=self.threshold,
                    include_confidence=True,
                    include_spans=True,
                )
                for i, r in zip(idx, out, strict=True):
                    results[i] = r
        spans: list[list[ScoredSpan]] = []
        pos = 0
        for d, chunks in enumerate(per_doc):
            merged = merge_chunk_results(
                texts[d], chunks, results[pos : pos + len(chunks)], include_confidence=True, include_spans=True,
                overlap_policy="flat",
            )  # fmt: skip
            pos += len(chunks)
            doc: list[ScoredSpan] = []
            for label, items in (merged.get("entities") or {}).items():
                for item in items or []:
                    s, e = int(item["start"]), int(item["end"])
                    if 0 <= s < e <= len(texts[d]):
                        doc.append(ScoredSpan(s, e, label, texts[d][s:e], float(item.get("confidence", 1.0))))
            spans.append(sorted(doc, key=lambda x: (x.start, x.end)))
        return spans


def build_from_encoder(encoder_dir: Path, *, seed: int = 0):
    """A new, untrained GLiNER2 on a local Hugging Face encoder folder (``clean train``'s starting point).

    gliner2 never trains its entity-count gate (the count loss skips entity tasks), and a random init
    predicts "0 entities" for every text about 5% of the time, which no threshold undoes; opening the gate
    is harmless for entity extraction, which only reads that one count.
    """
    import torch
    from gliner2 import ExtractorConfig, GLiNER2

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GLiNER2(ExtractorConfig(model_name=str(encoder_dir)))
    with torch.no_grad():
        model.count_pred[-1].bias[1] += 1e4
    return model
