"""Batched, cached encoding of texts with a SentenceTransformer, and the ``embed`` stage.

The cache (``jobembed.store``, one SQLite file per cache folder) keeps one namespace per encoder setting
(model fingerprint, prompt, max_seq_length, precision) and, inside it, one vector per SHA-1 of a text.
Vectors are written every ``checkpoint_every`` texts, so an interrupted run keeps what it finished, a
re-run encodes nothing it has seen, and two splits, two configs or two processes that share texts (the
label descriptions, reposts, a server's repeated requests) pay for them once.

Vectors are always L2-normalised float32: every consumer (cosine baselines, heads) works on the unit
sphere, and normalised vectors make cosine a dot product.

The ``embed`` stage writes, for every encoder of the run (``embed.model`` + ``embed.extra_models``), one
folder ``embed/<name>-<fingerprint>/`` with ``{train,val,test}.npy`` (rows in split order), ``labels.npy``
(the category texts, rows in ``labels.json`` order) and ``embeddings.json``; ``head`` and
``report`` read those files (``load_vectors``), never the encoder.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from jobembed import encoders, ui
from jobembed.artifacts import pause_for_test, read_json, write_json
from jobembed.config import default_cache_dir
from jobembed.data import SPLITS, label_texts
from jobembed.errors import DataError
from jobembed.sections import EmbedConfig
from jobembed.store import VectorTable, open_store

logger = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "jobembed-embeddings/2"
TAXONOMY_DIR = "taxonomy"


def text_key(text: str) -> bytes:
    """The cache key of one text: its SHA-1 (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def cache_namespace(*, fingerprint: str, prompt: str | None, max_seq_length: int, precision: str) -> str:
    """The cache namespace of one encoder setting; any change gives a new namespace."""
    raw = f"{fingerprint}|{prompt or ''}|{max_seq_length}|{precision}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


@dataclass
class EmbedStats:
    """What one call did: how many texts, how many unique, how many came from the cache."""

    n_texts: int = 0
    n_unique: int = 0
    n_cached: int = 0
    n_encoded: int = 0


class Embedder:
    """Encode texts for one encoder setting, loading the model only when the cache misses.

    Args:
        config: the ``embed`` section (max_seq_length, batch size, device, precision, cache).
        prompt: the prefix to put before every text (already resolved, e.g. ``"query: "``) or None.
        model: the encoder reference; default ``config.model``.
        backend: ``"torch"`` (the SentenceTransformer) or ``"onnx-int8"`` (``jobembed.onnx_backend``, faster on a
            CPU); int8 vectors differ slightly, so they get their own cache namespace. None: ``config.backend``.
        cache: False keeps nothing and reads nothing (a server measured without its cache).
    """

    def __init__(
        self,
        config: EmbedConfig,
        *,
        prompt: str | None = None,
        model: str | None = None,
        backend: Literal["torch", "onnx-int8"] | None = None,
        cache: bool = True,
        memory_cache: int | None = None,
    ) -> None:
        self.config = config
        self.prompt = prompt or None
        self.backend = backend or str(config.backend)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.resolved = encoders.resolve(model or config.model, cache_dir=self.cache_dir)
        self.model_ref = self.resolved.ref
        self.fingerprint = encoders.fingerprint_of(self.resolved)
        self.device = encoders.pick_device(config.device)
        self.precision = encoders.resolve_precision(str(config.precision), self.device)
        # int8 vectors: their own namespace
        vector_precision = self.precision if self.backend == "torch" else self.backend
        ns = cache_namespace(
            fingerprint=self.fingerprint,
            prompt=self.prompt,
            max_seq_length=config.max_seq_length,
            precision=vector_precision,
        )
        info = {
            "model": self.model_ref,
            "fingerprint": self.fingerprint,
            "prompt": self.prompt,
            "max_seq_length": config.max_seq_length,
            "precision": vector_precision,
        }
        self.cache: VectorTable | _NoCache | MemoryCache
        if not cache:
            self.cache = _NoCache()
        elif memory_cache is not None:
            self.cache = MemoryCache(memory_cache)
        else:
            self.cache = open_store(self.cache_dir).vectors(ns, info=info)
        self.last_stats = EmbedStats()
        self._model = None
        self._cache_warned = False

    @property
    def model(self):
        """The SentenceTransformer, loaded on first use (a warm cache never loads it); for a folder written by
        ``onnx_backend.save_folder`` (a bundle's ``encoder-onnx/``), its int8 ONNX encoder, without PyTorch."""
        if self._model is None and self.resolved.location is not None:
            from jobembed import onnx_backend

            if onnx_backend.is_folder(self.resolved.location):
                self._model = onnx_backend.OnnxEncoder.from_folder(self.resolved.location)
        if self._model is None:
            model = encoders.load_encoder(
                self.model_ref,
                device=self.config.device,
                max_seq_length=self.config.max_seq_length,
                precision=self.precision,
                cache_dir=self.cache_dir,
            )
            if self.backend == "onnx-int8":
                from jobembed.onnx_backend import load_onnx_int8

                model = load_onnx_int8(model, fingerprint=self.fingerprint, cache_dir=self.cache_dir)
            self._model = model
        return self._model

    def encode(self, texts: Sequence[str], *, progress: bool = False, description: str = "embedding") -> np.ndarray:
        """Embed ``texts``; with ``chunking: mean``, each as the mean of its windows (``chunks``).

        Args:
            texts: n strings (duplicates allowed; each distinct text is encoded once).
            progress: show a rich progress bar over the texts that need encoding.

        Returns:
            float32 array of shape (n, dim), L2-normalised rows, in input order.
        """
        texts = [str(t) for t in texts]
        if self.config.chunking == "none" or not texts:
            return self._encode_texts(texts, progress=progress, description=description)
        pieces = [self.chunks(t) for t in texts]
        flat = [c for cs in pieces for c in cs]
        vectors = self._encode_texts(flat, progress=progress, description=description)
        stats = self.last_stats
        bounds = np.cumsum([0] + [len(cs) for cs in pieces])
        pooled = np.stack([vectors[a:b].mean(axis=0) for a, b in itertools.pairwise(bounds)])
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        self.last_stats = EmbedStats(len(texts), len(set(texts)), stats.n_cached, stats.n_encoded)
        return pooled.astype(np.float32)

    def chunks(self, text: str) -> list[str]:
        """The windows of one text: exact substrings of ``max_seq_length`` tokens (prompt and special tokens
        included), ``chunk_stride`` tokens apart, at most ``max_chunks``; a text that fits is its own window,
        so it shares its cache entry with unchunked encoding."""
        tokenizer, room = self.model.tokenizer, self._window_tokens
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        if len(offsets) <= room:
            return [text]
        stride = min(self.config.chunk_stride, room)
        starts = list(range(0, max(len(offsets) - room, 0) + stride, stride))[: self.config.max_chunks]
        return [text[offsets[s][0] : offsets[min(s + room, len(offsets)) - 1][1]] for s in starts]

    @functools.cached_property
    def _window_tokens(self) -> int:
        """Text tokens per window: max_seq_length less the special tokens and the prompt (computed once)."""
        tokenizer = self.model.tokenizer
        room = self.config.max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)
        if self.prompt:
            room -= len(tokenizer(self.prompt, add_special_tokens=False)["input_ids"])
        return max(room, 8)

    def _encode_texts(self, texts: list[str], *, progress: bool, description: str) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        unique: dict[bytes, str] = dict(zip(keys, texts, strict=True))
        missing = self.cache.missing(list(unique))
        self.last_stats = EmbedStats(len(texts), len(unique), len(unique) - len(missing), len(missing))
        if not texts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        if not missing:
            return self.cache.get(keys)
        # Hits are read before encoding: a bounded cache may evict them while the misses are put. A read-only cache
        # keeps nothing, so freshly encoded vectors are taken from memory, not the store.
        absent = set(missing)
        hits = [k for k in unique if k not in absent]
        known = dict(zip(hits, self.cache.get(hits), strict=True)) if hits else {}
        known.update(self._encode_missing(missing, unique, progress=progress, description=description))
        return np.stack([known[k] for k in keys])

    def dimension(self) -> int:
        return self.cache.dim or int(self.model.get_embedding_dimension())

    def _encode_missing(
        self, missing: list[bytes], unique: dict[bytes, str], *, progress: bool, description: str
    ) -> dict[bytes, np.ndarray]:
        # Longest first, as SentenceTransformer.encode sorts internally: consecutive checkpoint chunks then
        # batch exactly like one big encode call, so checkpointing costs no extra padding.
        missing = sorted(missing, key=lambda k: -len(unique[k]))
        step = self.config.checkpoint_every
        fresh: dict[bytes, np.ndarray] = {}
        with ui.bar(enabled=progress) as bar:
            task = bar.add_task(description, total=len(missing))
            for start in range(0, len(missing), step):
                chunk = missing[start : start + step]
                vectors = self.model.encode(
                    [unique[k] for k in chunk],
                    prompt=self.prompt,
                    batch_size=self.config.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32, copy=False)
                self._keep(chunk, vectors)
                fresh.update(zip(chunk, vectors, strict=True))
                bar.advance(task, len(chunk))
        return fresh

    def _keep(self, keys: list[bytes], vectors: np.ndarray) -> None:
        """Write to the cache; a full disk or a folder made read-only under us costs the cache, not the answer."""
        try:
            self.cache.put(keys, vectors)
        except (sqlite3.Error, OSError) as e:
            if not self._cache_warned:
                logger.warning("cache %s: cannot write (%s); going on without keeping new vectors", self.cache_dir, e)
                self._cache_warned = True


class MemoryCache:
    """The cache interface over a bounded in-memory LRU of ``maxsize`` texts: what a server keeps, so that answering
    a stream of new texts grows neither files nor memory past the bound. Thread-safe; the server encodes on one
    thread, so nothing is evicted between one call's ``missing`` and ``get``."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.dim: int | None = None
        self._items: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        with self._lock:
            return [k for k in dict.fromkeys(keys) if k not in self._items]

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        with self._lock:
            rows = []
            for k in keys:
                rows.append(self._items[k])  # KeyError for a key evicted since missing(): the caller re-encodes
                self._items.move_to_end(k)
        return np.stack(rows) if rows else np.zeros((0, self.dim or 0), dtype=np.float32)

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        with self._lock:
            for k, v in zip(keys, vectors, strict=True):
                self._items[k] = np.array(v, dtype=np.float32, copy=True)
                self._items.move_to_end(k)
            if len(vectors) and self.dim is None:
                self.dim = int(vectors.shape[1])
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)


class _NoCache:
    """The cache interface with nothing in it and nothing kept (``Embedder(cache=False)``)."""

    dim = None

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        return list(dict.fromkeys(keys))

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        raise KeyError("the cache is off")

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        return None


def label_vectors(embedder: Embedder, texts: list[str], *, mode: str) -> np.ndarray:
    """``(k, d)`` category vectors from ``label_texts(labels, mode)``: each text's embedding, or with
    ``taxonomy_mean`` the mean of the unit-length embeddings of each label's lines (one text per line)."""
    if mode != "taxonomy_mean":
        return embedder.encode(texts)
    lines = [[line for line in t.split("\n") if line.strip()] or [t] for t in texts]
    flat = embedder.encode([line for group in lines for line in group])
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-12)
    ends = np.cumsum([len(g) for g in lines])
    return np.stack([flat[end - len(g) : end].mean(axis=0) for g, end in zip(lines, ends, strict=True)]).astype(
        np.float32
    )


def make_embedders(config: EmbedConfig, *, model: str | None = None) -> tuple[Embedder, Embedder]:
    """(texts embedder, label-texts embedder) for ``model`` (default ``config.model``), prompts from presets."""
    ref = model or config.model
    text_prompt, label_prompt = encoders.resolve_prompts(ref, config.text_prompt, config.label_prompt)
    text = Embedder(config, prompt=text_prompt, model=ref)
    # A second Embedder only differs in its cache namespace; encoders.load_encoder memoises the model.
    label = text if label_prompt == text_prompt else Embedder(config, prompt=label_prompt, model=ref)
    return text, label


def short_name(model_ref: str) -> str:
    """The readable tail of a model reference: ``builtin:multilingual-e5-small`` -> ``multilingual-e5-small``,
    ``owner/name@<commit>`` -> ``name``, ``runs/ft/encoder`` -> ``encoder``."""
    ref = model_ref.rstrip("/\\")
    if "@" in ref and not encoders._looks_like_path(ref):
        ref = ref.split("@", 1)[0]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", re.split(r"[/\\:]", ref)[-1]).strip("-")
    return (tail or "encoder").lower() if ref.lower().startswith("builtin:") else tail or "encoder"


def encoder_slug(model_ref: str, fingerprint: str) -> str:
    """A unique, readable name for one encoder: short name + fingerprint (folder names, report keys)."""
    return f"{short_name(model_ref)}-{fingerprint[:8]}"


def chunking_identity(config: EmbedConfig) -> dict[str, object] | None:
    """The chunking part of a vector file's identity (None when ads are truncated)."""
    if config.chunking == "none":
        return None
    return {"pooling": config.chunking, "stride": config.chunk_stride, "max_chunks": config.max_chunks}


def _ids_sha1(frame: pd.DataFrame) -> str:
    return hashlib.sha1("\n".join(frame["id"].astype(str)).encode()).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def embed_splits(
    *,
    splits: dict[str, pd.DataFrame],
    labels: pd.DataFrame,
    out_dir: Path,
    config: EmbedConfig,
    text_column: str = "text",
    taxonomy: pd.DataFrame | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """The ``embed`` stage: encode every split and the category texts with every encoder of the run.

    Args:
        splits: ``{"train", "val", "test"}`` frames with columns ``id`` and ``text_column``.
        labels: ``labels.json`` as a frame (``label``, ``name``, ``description``).
        out_dir: the run's ``embed/`` folder; receives one ``<name>-<fingerprint>/`` folder per encoder with
            ``{split}.npy`` (float32, (n_rows, dim), split order), ``labels.npy`` (labels.json order) and
            ``embeddings.json`` (model, fingerprint, prompts, length, precision, row counts, id hashes), and
            with ``taxonomy``, ``taxonomy/<name>-<fingerprint>.npy`` (rows in ``taxonomy`` order) and ``.json``:
            beside, not inside, the encoder's folder, so what reads only the splits' vectors (triplets) is not made
            again when taxonomy rows are turned on.
        taxonomy: prepare's ``taxonomy.parquet`` (``text``, ``label``, ...) when the systems train on its rows
            (``report.taxonomy_rows``): its texts are encoded like ads (the text prompt).

    Returns:
        canonical model reference -> its folder.
    """
    for name, frame in splits.items():
        if text_column not in frame.columns:
            raise DataError(
                f"split {name} has no column {text_column!r}",
                found="columns " + ", ".join(frame.columns),
                fix="pick an existing column with --text-col (run the stage that creates it first)",
            )
    out: dict[str, Path] = {}
    for model in config.models():
        text_emb, label_emb = make_embedders(config, model=model)
        folder = out_dir / encoder_slug(text_emb.model_ref, text_emb.fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, object] = {
            "format": EMBEDDINGS_FORMAT,
            "model": text_emb.model_ref,
            "fingerprint": text_emb.fingerprint,
            "text_prompt": text_emb.prompt,
            "label_prompt": label_emb.prompt,
            "max_seq_length": config.max_seq_length,
            "chunking": chunking_identity(config),
            "precision": text_emb.precision,
            "backend": text_emb.backend,
            "text_column": text_column,
            "label_text": str(config.label_text),
            "splits": {},
        }
        short = short_name(text_emb.model_ref)
        for name in SPLITS:
            frame = splits[name]
            vectors = text_emb.encode(frame[text_column].tolist(), progress=progress, description=f"{short}: {name}")
            _save_npy(folder / f"{name}.npy", vectors)
            pause_for_test("embed:split-written")  # interrupt tests stop here, one split written
            meta["splits"][name] = {  # type: ignore[index]
                "rows": len(frame),
                "dim": int(vectors.shape[1]),
                "ids_sha1": _ids_sha1(frame),
            }
            pause_for_test("embed:split-written")
        texts = label_texts(labels, str(config.label_text))
        _save_npy(folder / "labels.npy", label_vectors(label_emb, texts, mode=str(config.label_text)))
        meta["labels"] = {"rows": len(texts), "texts_sha1": hashlib.sha1("\n".join(texts).encode()).hexdigest()}
        if taxonomy is not None:
            rows = taxonomy["text"].astype(str).tolist()
            vectors = text_emb.encode(rows, progress=progress, description=f"{short}: taxonomy")
            (out_dir / TAXONOMY_DIR).mkdir(exist_ok=True)
            _save_npy(out_dir / TAXONOMY_DIR / f"{folder.name}.npy", vectors)
            write_json(
                out_dir / TAXONOMY_DIR / f"{folder.name}.json", {"rows": len(rows), "texts_sha1": texts_sha1(rows)}
            )
        write_json(folder / "embeddings.json", meta)
        out[text_emb.model_ref] = folder
    return out


def texts_sha1(texts: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class RunVectors:
    """One encoder's vectors for a prepared run, rows aligned with the splits and labels.json (and the taxonomy's
    rows in prepare's ``taxonomy.parquet`` order, when the run has a taxonomy)."""

    model: str
    fingerprint: str
    precision: str
    text_prompt: str | None
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    taxonomy: np.ndarray | None = None
    # An encoder fine-tuned with the classifier loss: its own linear layer (weight (k, d), bias (k,), classes).
    classifier: tuple[np.ndarray, np.ndarray, list[str]] | None = None


def load_vectors(
    embed_dir: Path,
    *,
    model: str,
    config: EmbedConfig,
    splits: dict[str, pd.DataFrame],
    labels: pd.DataFrame,
    text_column: str,
    taxonomy: pd.DataFrame | None = None,
) -> RunVectors:
    """Read the ``embed`` stage's vectors for ``model`` and check they still belong to these splits (and to
    ``taxonomy``'s texts, when given).

    Raises:
        DataError: no vectors for this encoder, or vectors made for other rows, another text column,
            prompt, length or label texts (re-run ``jobembed embed RUN``).
    """
    resolved = encoders.resolve(model, cache_dir=config.cache_dir)
    fingerprint = encoders.fingerprint_of(resolved)
    folder = Path(embed_dir) / encoder_slug(resolved.ref, fingerprint)
    rerun = f"re-run `jobembed embed {Path(embed_dir).parent}`"
    meta_path = folder / "embeddings.json"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        raise DataError(
            f"no embeddings of {resolved.ref} (fingerprint {fingerprint}) in {embed_dir}",
            fix=f"{rerun} (the encoder is embed.model or one of embed.extra_models)",
        ) from None
    text_prompt, label_prompt = encoders.resolve_prompts(resolved.ref, config.text_prompt, config.label_prompt)
    wanted = {
        "format": EMBEDDINGS_FORMAT,
        "text_prompt": text_prompt,
        "label_prompt": label_prompt,
        "max_seq_length": config.max_seq_length,
        "chunking": chunking_identity(config),
        "text_column": text_column,
        "label_text": str(config.label_text),
        "backend": str(config.backend),
    }
    meta.setdefault("backend", "torch")  # vectors made before the field: torch's
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise DataError(
                f"{meta_path} was made with {key}={meta.get(key)!r}, the run now asks for {value!r}", fix=rerun
            )
    vectors = {}
    for name in SPLITS:
        info = meta["splits"].get(name, {})
        if info.get("ids_sha1") != _ids_sha1(splits[name]):
            raise DataError(f"{folder}/{name}.npy was made for other rows than the {name} split", fix=rerun)
        vectors[name] = np.load(folder / f"{name}.npy", allow_pickle=False)
    texts = label_texts(labels, str(config.label_text))
    if meta.get("labels", {}).get("texts_sha1") != hashlib.sha1("\n".join(texts).encode()).hexdigest():
        raise DataError(f"{folder}/labels.npy was made for other category texts", fix=rerun)
    taxonomy_vectors = None
    if taxonomy is not None:
        where = Path(embed_dir) / TAXONOMY_DIR / folder.name
        try:
            made_for = read_json(where.with_suffix(".json")).get("texts_sha1")
        except (OSError, ValueError):
            made_for = None
        if made_for != texts_sha1(taxonomy["text"].astype(str).tolist()):
            raise DataError(f"{embed_dir} holds no vectors of this run's taxonomy texts ({where}.npy)", fix=rerun)
        taxonomy_vectors = np.load(where.with_suffix(".npy"), allow_pickle=False)
    return RunVectors(
        model=resolved.ref,
        fingerprint=fingerprint,
        precision=str(meta["precision"]),
        text_prompt=meta.get("text_prompt"),
        labels=np.load(folder / "labels.npy", allow_pickle=False),
        taxonomy=taxonomy_vectors,
        **vectors,
    )
