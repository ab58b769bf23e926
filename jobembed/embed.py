"""Batched, cached encoding of texts with a SentenceTransformer.

The cache is keyed by (model fingerprint, prompt, max_seq_length, precision) -> one folder, and inside it
by the SHA-1 of each text. Vectors are written in shards every ``checkpoint_every`` texts, so an
interrupted run keeps what it finished, a re-run encodes nothing it has seen, and two splits or two
configs that share texts (the label descriptions, reposts) pay for them once.

Vectors are always L2-normalised float32: every consumer (cosine baselines, heads) works on the unit
sphere, and normalised vectors make cosine a dot product.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.numpy import load_file, save_file

from jobembed import encoders
from jobembed.artifacts import write_json
from jobembed.config import EmbedConfig, default_cache_dir, write_resolved
from jobembed.errors import DataError

_KEY_BYTES = 20  # SHA-1 digest


def _text_key(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


@dataclass
class VectorCache:
    """Append-only shards of (text key, vector) in one namespace folder.

    Shards are safetensors files written atomically, so a crash mid-write leaves only a temp file that
    is ignored; nothing is ever pickled.
    """

    folder: Path
    _index: dict[bytes, tuple[int, int]] = field(default_factory=dict, init=False)
    _shards: list[np.ndarray] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                data = load_file(path)
            except Exception:  # a foreign or truncated file must not block the run; it is simply not used
                continue
            self._add(data["keys"], data["vectors"])

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        shard = len(self._shards)
        self._shards.append(vectors)
        for row, key in enumerate(keys):
            self._index[key.tobytes()] = (shard, row)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        """Vectors for keys that are all present, stacked in order."""
        return np.stack([self._shards[s][r] for s, r in (self._index[k] for k in keys)])

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Persist one shard, then make it visible in memory."""
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), _KEY_BYTES)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"keys": key_arr, "vectors": vectors}, str(tmp))
        os.replace(tmp, self.folder / name)
        self._add(key_arr, vectors)


def cache_namespace(*, fingerprint: str, prompt: str | None, max_seq_length: int, precision: str) -> str:
    """The cache folder name for one encoder setting; any change gives a new folder."""
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
        config: the ``embed`` section (model, max_seq_length, batch size, device, precision, cache).
        prompt: the prefix to put before every text (already resolved, e.g. ``"query: "``) or None.
    """

    def __init__(self, config: EmbedConfig, *, prompt: str | None = None) -> None:
        self.config = config
        self.prompt = prompt or None
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.fingerprint = encoders.model_fingerprint(config.model, cache_dir=self.cache_dir)
        self.device = encoders.pick_device(config.device)
        self.precision = config.precision
        if self.precision == "auto":
            self.precision = "fp16" if self.device == "cuda" else "fp32"
        ns = cache_namespace(
            fingerprint=self.fingerprint,
            prompt=self.prompt,
            max_seq_length=config.max_seq_length,
            precision=self.precision,
        )
        self.cache = VectorCache(self.cache_dir / "embeddings" / ns)
        self.last_stats = EmbedStats()
        self._model = None

    @property
    def model(self):
        """The SentenceTransformer, loaded on first use (a warm cache never loads it)."""
        if self._model is None:
            self._model = encoders.load_encoder(
                self.config.model,
                device=self.config.device,
                max_seq_length=self.config.max_seq_length,
                precision=self.precision,
                cache_dir=self.cache_dir,
            )
        return self._model

    def encode(self, texts: Sequence[str], *, progress: bool = False, description: str = "embedding") -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: n strings (duplicates allowed; each distinct text is encoded once).
            progress: show a rich progress bar over the texts that need encoding.

        Returns:
            float32 array of shape (n, dim), L2-normalised rows, in input order.
        """
        texts = [str(t) for t in texts]
        keys = [_text_key(t) for t in texts]
        unique: dict[bytes, str] = dict(zip(keys, texts, strict=True))
        missing = [k for k in unique if k not in self.cache]
        self.last_stats = EmbedStats(len(texts), len(unique), len(unique) - len(missing), len(missing))
        if missing:
            self._encode_missing(missing, unique, progress=progress, description=description)
        if not texts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        return self.cache.get(keys)

    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def _encode_missing(self, missing: list[bytes], unique: dict[bytes, str], *, progress: bool, description: str):
        # Longest first, as SentenceTransformer.encode sorts internally: consecutive checkpoint chunks then
        # batch exactly like one big encode call, so checkpointing costs no extra padding.
        missing.sort(key=lambda k: -len(unique[k]))
        step = self.config.checkpoint_every
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress, transient=True) as bar:
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
                )
                self.cache.put(chunk, vectors.astype(np.float32, copy=False))
                bar.advance(task, len(chunk))


def make_embedders(config: EmbedConfig) -> tuple[Embedder, Embedder]:
    """(texts embedder, label-texts embedder) with the family's prompts resolved from presets."""
    text_prompt, label_prompt = encoders.resolve_prompts(config.model, config.text_prompt, config.label_prompt)
    text = Embedder(config, prompt=text_prompt)
    # A second Embedder only differs in its cache namespace; encoders.load_encoder memoises the model.
    label = text if label_prompt == text_prompt else Embedder(config, prompt=label_prompt)
    return text, label


def short_name(model_ref: str) -> str:
    """The readable tail of a model reference: ``builtin:multilingual-e5-small`` -> ``multilingual-e5-small``."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", model_ref.rstrip("/").split("/")[-1].split(":")[-1]).strip("-")
    return tail or "encoder"


def encoder_slug(model_ref: str, fingerprint: str) -> str:
    """A folder name for one encoder's outputs inside a run: readable ref tail + fingerprint."""
    return f"{short_name(model_ref)}-{fingerprint[:8]}"


def embed_splits(
    *, prepare_dir: Path, out_dir: Path, config: EmbedConfig, text_column: str = "text", progress: bool = True
) -> dict[str, Path]:
    """The ``embed`` stage: encode every split of a prepared run.

    Args:
        prepare_dir: folder with ``{train,val,test}.parquet`` (columns ``id`` and ``text_column``).
        out_dir: receives ``{split}.npy`` (float32, (n_rows, dim), rows in split order), ``embeddings.json``
            (model, fingerprint, prompt, dims, row counts, hash of the ids) and ``config.yaml``.

    Returns:
        split name -> path of its ``.npy`` file.
    """
    from jobembed.data import load_splits  # local: data is not needed to embed plain text lists

    splits = load_splits(prepare_dir)
    embedder, _ = make_embedders(config)
    paths: dict[str, Path] = {}
    meta: dict[str, object] = {
        "format": "jobembed-embeddings/1",
        "model": config.model,
        "fingerprint": embedder.fingerprint,
        "prompt": embedder.prompt,
        "max_seq_length": config.max_seq_length,
        "precision": embedder.precision,
        "text_column": text_column,
        "splits": {},
    }
    for name, frame in splits.items():
        if text_column not in frame.columns:
            raise DataError(
                f"split {name} has no column {text_column!r}",
                found=", ".join(frame.columns),
                fix="pick an existing column with --text-column (run the stage that creates it first)",
            )
        vectors = embedder.encode(frame[text_column].tolist(), progress=progress, description=f"embed {name}")
        path = out_dir / f"{name}.npy"
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, vectors)
        os.replace(tmp, path)
        paths[name] = path
        meta["splits"][name] = {  # type: ignore[index]
            "rows": len(frame),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 and len(frame) else None,
            "ids_sha1": hashlib.sha1("\n".join(frame["id"].astype(str)).encode()).hexdigest(),
            "cached": embedder.last_stats.n_cached,
            "encoded": embedder.last_stats.n_encoded,
        }
    write_json(out_dir / "embeddings.json", meta)
    write_resolved(config, out_dir)
    return paths


def load_split_vectors(embed_dir: Path, split: str, *, expected_rows: int) -> np.ndarray:
    """Read one split's vectors and check they still match the split they were made for."""
    path = embed_dir / f"{split}.npy"
    if not path.is_file():
        raise DataError(f"{path} not found", fix="run `jobembed embed RUN_DIR` first")
    vectors = np.load(path, allow_pickle=False)
    if len(vectors) != expected_rows:
        raise DataError(
            f"{path} has {len(vectors)} rows but split {split} has {expected_rows}",
            fix="the split changed after embedding; re-run `jobembed embed RUN_DIR`",
        )
    return vectors
