"""An int8 ONNX Runtime encoder for serving on CPU: the bundle's SentenceTransformer, exported and dynamically
quantised once, answering ``encode`` like the torch model.

Why by hand: sentence-transformers' own ONNX backend (``backend="onnx"``, ``export_dynamic_quantized_onnx_model``)
goes through ``optimum-onnx``, whose releases pin ``transformers<4.58``, while sentence-transformers 6 needs
transformers 5; installing it downgrades transformers and breaks the import (seen 2026-11-27 with optimum-onnx
0.1.0). What is left is small and uses the well-kept pieces directly: ``torch.onnx.export`` of the transformer,
``onnxruntime.quantization.quantize_dynamic`` (the same QInt8 per-channel weights and dynamic uint8 activations as
sentence-transformers' ``avx512_vnni`` preset), and the model's own tokenizer and pooling settings.

Supported: encoders made of Transformer -> Pooling (mean, cls or max; prompt included) [-> Normalize], which
covers the e5, MiniLM and mpnet families jobembed uses. Anything else is refused with one line.

The exported file lives in the cache folder, keyed by the encoder's content fingerprint, so a server pays the
export (seconds to a minute) once per encoder; a read-only cache exports into a temporary folder each start.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobembed.errors import JobembedError

logger = logging.getLogger(__name__)

_POOLINGS = {"mean", "cls", "max"}


class OnnxError(JobembedError):
    """The encoder cannot be exported or run with ONNX Runtime."""


def _check_supported(model: Any) -> str:
    """The pooling mode of a supported SentenceTransformer; raises OnnxError for anything else."""
    names = [type(m).__name__ for m in model]
    if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
        raise OnnxError(
            f"the ONNX backend supports Transformer -> Pooling [-> Normalize] encoders, found {' -> '.join(names)}",
            fix="serve this bundle with --backend torch",
        )
    pooling = model[1]
    mode = str(getattr(pooling, "pooling_mode", None) or pooling.get_pooling_mode_str())
    if mode not in _POOLINGS or not getattr(pooling, "include_prompt", True):
        raise OnnxError(
            f"the ONNX backend supports mean, cls and max pooling with the prompt included, found {mode}",
            fix="serve this bundle with --backend torch",
        )
    return mode


def export_int8(model: Any, target: Path) -> Path:
    """Export ``model`` (a loaded SentenceTransformer) to ``target`` as an int8 ONNX graph, atomically.

    Returns:
        ``target`` (an ``.onnx`` file whose inputs are the tokenizer's tensors and whose output is the
        transformer's last hidden state).
    """
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_supported(model)
    transformer = model[0].auto_model.eval()
    names = _input_names(model.tokenizer)

    class _Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = transformer

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, tensors, strict=True))).last_hidden_state

    sample = model.tokenizer(["query: a sample text", "two"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        # The tracer warns about two Python branches in transformers' mask code (padding beyond the mask, a
        # causal flag); both depend only on whether a mask is given, which it always is, so the trace holds for
        # every batch shape (tests compare the export with torch on texts of different lengths).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Wrapped(),
                tuple(sample[n] for n in names),
                str(fp32),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,  # the TorchScript exporter needs no onnxscript and handles HF attention masks
            )
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(int8, target)
    return target


def _input_names(tokenizer: Any) -> list[str]:
    found = tokenizer(["x"], return_tensors="np")
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in found]


class OnnxEncoder:
    """``encode`` with the SentenceTransformer's contract (prompt, batches, normalised float32) on ONNX Runtime.

    Args:
        model: the loaded torch SentenceTransformer (its tokenizer and settings are reused; the weights are not).
        path: the int8 ``.onnx`` file from ``export_int8``.
        threads: ONNX Runtime intra-op threads; 0 lets it use every core.
    """

    def __init__(self, model: Any, path: Path, *, threads: int = 0) -> None:
        self.pooling = _check_supported(model)
        self.normalize = any(type(m).__name__ == "Normalize" for m in model)
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length)
        self._dim = int(model.get_embedding_dimension())
        self._names = _input_names(self.tokenizer)
        self._session(path, threads)

    def _session(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def from_folder(cls, folder: str | Path, *, threads: int = 0) -> OnnxEncoder:
        """An encoder from ``save_folder``'s folder: onnxruntime and tokenizers only, no PyTorch."""
        from jobembed.artifacts import check_format, read_json

        folder = Path(folder)
        meta = read_json(folder / FOLDER_META)
        check_format(folder / FOLDER_META, meta, FOLDER_FORMAT)
        self = cls.__new__(cls)
        self.pooling, self.normalize = str(meta["pooling"]), bool(meta["normalize"])
        self.tokenizer = _FastTokenizer(folder, meta)
        self.max_seq_length, self._dim = int(meta["max_seq_length"]), int(meta["dim"])
        self._names = list(meta["input_names"])
        self._session(folder / "model.onnx", threads)
        return self

    def get_embedding_dimension(self) -> int:
        return self._dim

    def encode(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        **_: Any,
    ) -> np.ndarray:
        """(n, dim) float32 vectors; longest texts batched together, as SentenceTransformer.encode does."""
        texts = [f"{prompt or ''}{t}" for t in texts]
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="np",
            )
            hidden = self.session.run(None, {n: enc[n].astype(np.int64) for n in self._names})[0]
            out[idx] = self._pool(hidden, enc["attention_mask"])
        if normalize_embeddings or self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask[..., None].astype(np.float32)
        if self.pooling == "max":
            return np.where(m > 0, hidden, -1e9).max(axis=1)
        return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


FOLDER_FORMAT = "jobembed-onnx-encoder/1"
FOLDER_META = "onnx.json"


def save_folder(model: Any, target: Path, *, fingerprint: str, cache_dir: Path) -> Path:
    """The int8 encoder as a folder that runs without PyTorch or sentence-transformers: ``model.onnx`` (the cached
    export, made on first use), ``tokenizer.json`` (the fast tokenizer, special tokens and normalisation included) and
    ``onnx.json`` (pooling, normalisation, length, dimension, input names, the source encoder's fingerprint).

    Raises:
        OnnxError: the encoder is not a Transformer -> Pooling [-> Normalize] stack, or has no fast tokenizer.
    """
    from jobembed.artifacts import write_json

    encoder = load_onnx_int8(model, fingerprint=fingerprint, cache_dir=cache_dir)
    backend = getattr(model.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OnnxError("the encoder has no fast tokenizer to ship with its ONNX export", fix="bundle with torch")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder.path, target / "model.onnx")
    backend.save(str(target / "tokenizer.json"))
    write_json(
        target / FOLDER_META,
        {
            "format": FOLDER_FORMAT,
            "pooling": encoder.pooling,
            "normalize": encoder.normalize,
            "max_seq_length": encoder.max_seq_length,
            "dim": encoder.get_embedding_dimension(),
            "input_names": encoder._names,
            "pad_token_id": int(model.tokenizer.pad_token_id or 0),
            "pad_token": str(model.tokenizer.pad_token or "<pad>"),
            "source_fingerprint": fingerprint,
        },
    )
    return target


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_folder``."""
    return (Path(path) / FOLDER_META).is_file()


class _FastTokenizer:
    """What ``OnnxEncoder`` calls on a tokenizer, over the ``tokenizers`` library alone (no transformers)."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.pad_id, self.pad_token = int(meta["pad_token_id"]), str(meta["pad_token"])

    def __call__(self, texts: list[str], *, max_length: int, **_: Any) -> dict[str, np.ndarray]:
        self.inner.enable_truncation(max_length=max_length)
        self.inner.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token)
        batch = self.inner.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in batch], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in batch], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in batch], dtype=np.int64),
        }


def load_onnx_int8(model: Any, *, fingerprint: str, cache_dir: Path, threads: int = 0) -> OnnxEncoder:
    """The int8 ONNX encoder of ``model``: from ``<cache>/onnx/<fingerprint>-int8.onnx``, exported on first use."""
    target = Path(cache_dir) / "onnx" / f"{fingerprint}-int8.onnx"
    if not target.is_file():
        try:
            logger.info("exporting the encoder to int8 ONNX (once per encoder): %s", target)
            export_int8(model, target)
        except OSError as e:
            # A read-only or full cache folder: export into a temporary folder that lives as long as the process.
            logger.warning("cannot write %s (%s); exporting into a temporary folder", target, e)
            tmp = Path(tempfile.mkdtemp(prefix="jobembed-onnx-"))
            target = export_int8(model, tmp / "int8.onnx")
            import atexit

            atexit.register(shutil.rmtree, tmp, True)
    return OnnxEncoder(model, target, threads=threads)
