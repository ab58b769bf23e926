"""The deployable bundle: everything ``classify`` (and later ``serve``) needs, in one folder.

```
bundle/
  bundle.json      format tag, system, encoder (reference, content fingerprint, Hub revision, prompt, length,
                   precision of the vectors the head was trained on), classify defaults, file hashes, metrics
  head/            head.safetensors + head.json (MLP head or cosine prototypes), or hybrid.json + tfidf/ (TF-IDF
                   vocabularies in JSON, weights in safetensors) + mlp/ for a hybrid head; never pickle
  labels.json      label, name, description for every class
  config.yaml      the resolved pipeline config that produced it
  encoder/         optional copy of the encoder (``bundle.copy_encoder``)
  extractor/       with copy_encoder, a local GLiNER2 cleaner's model too
```
A head trained on cleaned text (``text_column: clean_text``) carries its cleaner in ``bundle.json``
(the ``clean`` section and the fingerprints of its pattern files and model): ``predict`` puts every text
through it, so such a head never sees raw text.

Loading validates ``bundle.json`` against its schema, checks the format version and the hash of every file
in the folder (a file that is not listed is refused too), and, on first use, that the encoder still has
the fingerprint the head was trained on: a head on vectors from another encoder would answer confidently
and wrongly. Everything wrong is one ``BundleError`` line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobembed import __version__, encoders, metrics
from jobembed.artifacts import atomic_dir, file_sha256, read_json, write_json
from jobembed.baselines import CosineClassifier
from jobembed.clean.core import Cleaner, CleanResult
from jobembed.config import TextColumn, write_resolved
from jobembed.embed import chunking_identity
from jobembed.errors import BundleError, JobembedError
from jobembed.fingerprint import folder_fingerprint
from jobembed.head import MLPHead
from jobembed.hybrid import HybridHead
from jobembed.sections import ClassifyConfig, CleanBackend, CleanConfig, EmbedConfig
from jobembed.topdown import TopDownHead

if TYPE_CHECKING:
    from jobembed.config import PipelineConfig

logger = logging.getLogger(__name__)

# /3: bundle.json carries meta_sha256, the digest of its own fields, so an edit to a setting that changes answers
# (encoder.max_seq_length, classify.min_confidence, the abstention answers) is refused as any edited file is.
BUNDLE_FORMAT = "jobembed-bundle/3"
_BUNDLE_NAME = BUNDLE_FORMAT.split("/")[0]


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleEncoder(_Meta):
    """How to embed texts exactly as the head's training vectors were embedded."""

    ref: str  # what to load: the source reference, or "./encoder" for a copy inside the bundle
    source_ref: str  # canonical reference the vectors were made with (Hub ids pinned to a commit)
    fingerprint: str  # content fingerprint of source_ref
    copy_fingerprint: str | None = None  # fingerprint of ./encoder when copied (a Hub model saved locally differs)
    revision: str | None = None  # Hub commit, for Hub encoders
    text_prompt: str | None
    max_seq_length: int = Field(ge=1)
    precision: Literal["fp32", "fp16", "bf16"]
    # embed.chunking of the training vectors (pooling, stride, max_chunks); None: ads were truncated.
    chunking: dict[str, Any] | None = None
    # embed.backend of the training vectors: new ads are encoded the same way unless a server asks otherwise.
    backend: Literal["torch", "onnx-int8"] = "torch"
    # bundle.backend onnx-int8: the encoder's int8 ONNX export and tokenizer inside the bundle ("./encoder-onnx"), run
    # without PyTorch when the backend is onnx-int8; its folder fingerprint.
    onnx: str | None = None
    onnx_fingerprint: str | None = None


class BundleCleaner(_Meta):
    """The cleaner the head's training texts went through; ``classify`` applies it to every new text."""

    config: dict[str, Any]  # the run's ``clean`` section (model -> "./extractor" when copied)
    info: dict[str, Any]  # Cleaner.info() at training time: backend, pattern and model fingerprints, schema


REPORT_PAGE = "report.html"
ONNX_DIR = "encoder-onnx"
HeadKind = Literal["mlp", "cosine", "hybrid", "topdown"]
Head = MLPHead | CosineClassifier | HybridHead | TopDownHead


def load_head(path: Path, kind: str, *, device: str = "auto") -> Head:
    """A saved head of any kind (``report.head_kind``): safetensors and JSON only."""
    if kind == "mlp":
        return MLPHead.load(path, device=device)
    if kind == "hybrid":
        return HybridHead.load(path, device=device)
    if kind == "topdown":
        return TopDownHead.load(path, device=device)
    return CosineClassifier.load(path)


def _kind_of(model: Head) -> HeadKind:
    if isinstance(model, MLPHead):
        return "mlp"
    if isinstance(model, HybridHead):
        return "hybrid"
    return "topdown" if isinstance(model, TopDownHead) else "cosine"


def reads_texts(head: Head) -> bool:
    """Whether the head's ``predict_proba`` takes the texts beside the vectors (the lexical part of a hybrid)."""
    return isinstance(head, HybridHead | TopDownHead)


class BundleHead(_Meta):
    kind: HeadKind
    path: str


class BundleMeta(_Meta):
    """The schema of ``bundle.json``."""

    format: str
    created: str
    jobembed_version: str
    system: str
    text_column: str
    head: BundleHead
    encoder: BundleEncoder
    cleaner: BundleCleaner | None = None
    classes: list[str] = Field(min_length=2)
    classify: ClassifyConfig
    files: dict[str, str] = Field(min_length=1)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # SHA-256 of every other field (meta_digest): bundle.json is covered by the hash check like the files it lists.
    meta_sha256: str = ""


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of bundle.json's fields other than ``meta_sha256``, as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class EncoderInfo:
    """The encoder setting a head's vectors were made with (``embed.RunVectors`` has the same fields)."""

    model: str
    fingerprint: str
    precision: str
    text_prompt: str | None
    max_seq_length: int


def save_bundle(
    out_dir: Path,
    *,
    model: Head,
    system: str,
    encoder: EncoderInfo,
    config: PipelineConfig,
    labels: pd.DataFrame,
    metrics: dict[str, Any] | None = None,
    copy_encoder: bool = False,
    report_page: Path | None = None,
    onnx: bool = False,
) -> Path:
    """Write a bundle folder (replacing an older one as a whole, atomically).

    Args:
        model: a fitted MLPHead, HybridHead, TopDownHead or cosine classifier on ``encoder``'s vectors.
        system: the system name it came from (``mlp``, ``hier``, ``fusion``, ``stack``, ``centroid``, ``zeroshot``).
        encoder: the encoder setting of the training vectors (reference, fingerprint, precision, prompt, length).
        labels: frame with ``label``, ``name``, ``description``.
        copy_encoder: copy the encoder into the bundle, for machines without the cache or the Hub.
        report_page: the report's page (``report/index.html``), kept as ``report.html`` (hash-checked like the rest).
        onnx: also keep the encoder as its int8 ONNX export and tokenizer (``encoder-onnx/``), for a server without
            PyTorch (``onnx_backend.save_folder``).
    """
    resolved = encoders.resolve(encoder.model, cache_dir=config.embed.cache_dir)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save(tmp / "head")
        if report_page is not None:
            shutil.copyfile(report_page, tmp / REPORT_PAGE)
        write_json(tmp / "labels.json", labels[["label", "name", "description"]].to_dict(orient="records"))
        write_resolved(config, tmp)
        ref, copy_fp = resolved.ref, None
        if copy_encoder:
            _copy_encoder(resolved, tmp / "encoder", config=config)
            ref, copy_fp = "./encoder", folder_fingerprint(tmp / "encoder")
        cleaner = None
        if config.text_column == TextColumn.clean_text:
            cleaner = _bundle_cleaner(config, tmp, copy=copy_encoder)
        onnx_ref, onnx_fp = _bundle_onnx(config, encoder, tmp) if onnx else (None, None)
        files = {rel: file_sha256(tmp / rel) for rel in _bundle_files(tmp)}
        meta = BundleMeta(
            format=BUNDLE_FORMAT,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            jobembed_version=__version__,
            system=system,
            text_column=config.text_column,
            head=BundleHead(
                kind=_kind_of(model),
                path="head",
            ),
            encoder=BundleEncoder(
                ref=ref,
                source_ref=resolved.ref,
                fingerprint=encoder.fingerprint,
                copy_fingerprint=copy_fp,
                revision=resolved.revision,
                text_prompt=encoder.text_prompt,
                max_seq_length=encoder.max_seq_length,
                precision=encoder.precision,
                chunking=chunking_identity(config.embed),
                backend=str(config.embed.backend),
                onnx=onnx_ref,
                onnx_fingerprint=onnx_fp,
            ),
            cleaner=cleaner,
            classes=[str(c) for c in model.classes_],
            classify=config.classify,
            files=files,
            metrics=metrics or {},
        )
        fields = meta.model_dump(mode="json")
        write_json(tmp / "bundle.json", fields | {"meta_sha256": meta_digest(fields)})
    return Path(out_dir)


def _bundle_onnx(config: PipelineConfig, encoder: EncoderInfo, tmp: Path) -> tuple[str, str]:
    """The encoder's int8 ONNX export with its tokenizer in ``tmp/encoder-onnx`` (a server runs it without PyTorch)."""
    from jobembed.embed import Embedder
    from jobembed.onnx_backend import save_folder

    if config.embed.chunking != "none":
        raise BundleError(
            "bundle.backend onnx-int8 cannot serve chunked encoding (embed.chunking): its tokenizer has no offsets",
            fix="bundle with --backend torch, or embed without chunking",
        )
    section = config.embed.model_copy(update={"model": encoder.model, "max_seq_length": encoder.max_seq_length})
    embedder = Embedder(section, prompt=encoder.text_prompt, backend="torch", cache=False)
    save_folder(embedder.model, tmp / ONNX_DIR, fingerprint=encoder.fingerprint, cache_dir=embedder.cache_dir)
    return f"./{ONNX_DIR}", folder_fingerprint(tmp / ONNX_DIR)


def _bundle_cleaner(config: PipelineConfig, tmp: Path, *, copy: bool) -> BundleCleaner:
    """The run's cleaner for the bundle; a local GLiNER2 folder is copied along with the encoder."""
    clean = Cleaner(config.clean)
    section = config.clean.model_dump(mode="json", exclude={"cache_dir", "device"})
    if copy and clean.backend is CleanBackend.gliner2:
        resolved = encoders.resolve(config.clean.model, cache_dir=config.clean.cache_dir)
        if resolved.kind == "local":
            shutil.copytree(resolved.location, tmp / "extractor")
            section["model"] = "./extractor"
    return BundleCleaner(config=section, info=clean.info())


def _bundle_files(folder: Path) -> list[str]:
    """Every file that makes up a bundle, relative: all but bundle.json, the pipeline's stage stamp and hidden
    files (caches such as the encoder's fingerprint sidecar, which may be rewritten where it is deployed)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel in {"bundle.json", "stage.json"} or any(part.startswith(".") for part in Path(rel).parts):
            continue
        if p.is_file():
            out.append(rel)
    return out


def _copy_encoder(resolved: encoders.ResolvedModel, target: Path, *, config: PipelineConfig) -> None:
    if resolved.kind == "hub":
        # The Hub cache holds symlinks and maybe more files than the model needs; save what was loaded.
        model = encoders.load_encoder(resolved.ref, device="cpu", precision="fp32", cache_dir=config.embed.cache_dir)
        model.save(str(target))
    else:
        # copy2 keeps mtimes, so the fingerprint sidecar travels along and the copy is not re-hashed.
        shutil.copytree(resolved.location, target)


@dataclass
class Prediction:
    """One text's answer: the top label (or the uncertain label) and the top-k alternatives."""

    text: str
    label: str
    name: str
    confidence: float
    uncertain: bool
    top_k: list[dict[str, Any]]
    # Why the answer is uncertain when confidence is not the reason (nothing left to read); None otherwise.
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "name": self.name,
            "confidence": round(self.confidence, 4),
            "uncertain": self.uncertain,
            "reason": self.reason,
            "top_k": self.top_k,
        }


_WORD = re.compile(r"\w")


def nothing_to_read(text: str) -> bool:
    """True for a text with no letter or digit (emoji, punctuation, or what the cleaner left of a contact line): any
    label for it would be the head's prior, not an answer."""
    return _WORD.search(text) is None


class Bundle:
    """A loaded bundle; ``predict`` embeds texts with the bundle's encoder and applies the head."""

    def __init__(
        self,
        path: Path,
        meta: BundleMeta,
        head: Head,
        labels: pd.DataFrame,
        *,
        device: str = "auto",
        backend: Literal["torch", "onnx-int8"] = "torch",
        cache: bool = True,
        memory_cache: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.path, self.meta, self.head, self.labels, self.device = path, meta, head, labels, device
        self.backend, self.use_cache, self.batch_size = backend, cache, batch_size
        self.memory_cache = memory_cache
        self.names = dict(zip(labels["label"].astype(str), labels["name"].astype(str), strict=True))
        self._embedder = None
        self._cleaner: Cleaner | None = None

    @property
    def cleaner(self) -> Cleaner | None:
        """The cleaner the head was trained behind (None for raw text); checked against the bundle on first use."""
        if self.meta.cleaner is None or self.meta.text_column != TextColumn.clean_text:
            return None
        if self._cleaner is None:
            section = dict(self.meta.cleaner.config)
            if str(section.get("model", "")).startswith("./"):
                section["model"] = str(self.path / section["model"])
            cleaner = Cleaner(CleanConfig.model_validate({**section, "device": self.device}))
            now, then = cleaner.info(), dict(self.meta.cleaner.info)
            if then.get("model") and section["model"] != then["model"]:
                now["model"] = then["model"]  # a copy inside the bundle: same content, other path
            if now != then:
                changed = sorted(k for k in then.keys() | now.keys() if now.get(k) != then.get(k))
                raise BundleError(
                    f"{self.path}: the cleaner differs from the one the head was trained behind ({', '.join(changed)})",
                    fix="install the jobembed version that made the bundle, use the same extractor files, "
                    "or re-create the bundle",
                )
            self._cleaner = cleaner
        return self._cleaner

    def prepare_texts(self, texts: list[str], *, progress: bool = False) -> list[str]:
        """What the head sees: the texts through the bundle's cleaner, or as they are."""
        cleaner = self.cleaner
        return texts if cleaner is None else cleaner.clean(texts, progress=progress).texts

    @property
    def runs_onnx_folder(self) -> bool:
        """Whether the encoder runs from the bundle's own int8 ONNX folder (onnx-int8, and the bundle has one)."""
        return self.backend == "onnx-int8" and self.meta.encoder.onnx is not None

    @property
    def encoder_ref(self) -> str:
        ref = self.meta.encoder.onnx if self.runs_onnx_folder else self.meta.encoder.ref
        return str(self.path / ref) if ref.startswith("./") else ref

    @property
    def classify_defaults(self) -> ClassifyConfig:
        """The ``classify`` section of the run that made the bundle (top-k, confidence threshold)."""
        return self.meta.classify

    @property
    def embedder(self):
        """The cached embedder for the bundle's encoder; checks the fingerprint on first use."""
        if self._embedder is None:
            from jobembed.embed import Embedder

            enc = self.meta.encoder
            device = encoders.pick_device(self.device)
            precision = enc.precision
            if precision != "fp32" and not device.startswith("cuda"):
                logger.info("bundle vectors were made in %s; encoding in fp32 on %s", precision, device)
                precision = "fp32"
            cfg = EmbedConfig(
                model=self.encoder_ref,
                text_prompt=enc.text_prompt,
                label_prompt=None,
                max_seq_length=enc.max_seq_length,
                device=self.device,
                precision=precision,
                **({} if self.batch_size is None else {"batch_size": self.batch_size}),
                **(
                    {}
                    if enc.chunking is None
                    else {
                        "chunking": enc.chunking["pooling"],
                        "chunk_stride": enc.chunking["stride"],
                        "max_chunks": enc.chunking["max_chunks"],
                    }
                ),
            )
            embedder = Embedder(
                cfg, prompt=enc.text_prompt, backend=self.backend, cache=self.use_cache, memory_cache=self.memory_cache
            )
            expected = enc.copy_fingerprint if enc.ref.startswith("./") and enc.copy_fingerprint else enc.fingerprint
            if self.runs_onnx_folder:
                expected = enc.onnx_fingerprint or ""
            if embedder.fingerprint != expected:
                raise BundleError(
                    f"{self.path}: the encoder {self.encoder_ref!r} is not the one the head was trained on",
                    expected=f"fingerprint {expected}",
                    found=embedder.fingerprint,
                    fix="use the same model files, or re-create the bundle with copy_encoder",
                )
            self._embedder = embedder
        return self._embedder

    def predict_proba(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """(n, n_classes) probabilities, columns in ``self.head.classes_`` order."""
        return self.predict_proba_explained(texts, progress=progress)[0]

    def predict_proba_explained(
        self, texts: list[str], *, progress: bool = False
    ) -> tuple[np.ndarray, CleanResult | None]:
        """``predict_proba`` and what the head read: the cleaner's result (texts, spans), or None for raw text."""
        cleaner = self.cleaner
        cleaned = None if cleaner is None else cleaner.clean(list(texts), progress=progress)
        seen = list(texts) if cleaned is None else cleaned.texts
        X = self.embedder.encode(seen, progress=progress, description="classify")
        if reads_texts(self.head):
            return self.head.predict_proba(X, texts=seen), cleaned
        return self.head.predict_proba(X), cleaned

    def classify_config(
        self,
        *,
        top_k: int | None = None,
        min_confidence: float | None = None,
        target_accuracy: float | None = None,
    ) -> ClassifyConfig:
        """The bundle's ``classify`` section with a caller's choices on top (None keeps the bundle's), for the CLI
        and the server alike. An explicit ``min_confidence`` without ``target_accuracy`` beats the bundle's
        target; a target is turned into its validation threshold here, so a bad one fails before any encoding.

        Raises:
            BundleError, JobembedError: as ``threshold_for``.
        """
        flags = {"top_k": top_k, "min_confidence": min_confidence, "target_accuracy": target_accuracy}
        cfg = self.classify_defaults.model_copy(update={k: v for k, v in flags.items() if v is not None})
        if min_confidence is not None and target_accuracy is None:
            cfg = cfg.model_copy(update={"target_accuracy": None})
        if cfg.target_accuracy is not None:
            cfg = cfg.model_copy(update={"min_confidence": self.threshold_for(cfg.target_accuracy)})
        return cfg

    def threshold_for(self, target_accuracy: float) -> float:
        """The confidence threshold at which the bundled system's out-of-fold answers reached ``target_accuracy``.

        Computed by ``metrics.threshold_from_scores`` on the out-of-fold ``(confidence, correct)`` pairs
        report stored in the bundle: the same rule and data as the report's threshold, so for the report's
        target the two are the same number.

        Raises:
            BundleError: the bundle has no out-of-fold answers (made by head, or from a system that was not
                cross-validated, such as the fine-tuned encoder's).
            JobembedError: the out-of-fold answers never reached the target at any threshold.
        """
        selective = self.meta.metrics.get("selective") or {}
        scores = selective.get("oof_scores")
        if not scores or not scores.get("confidence"):
            raise BundleError(
                f"{self.path}: the bundle has no out-of-fold answers to choose a --target-accuracy threshold on",
                fix="use a bundle made by `jobembed bundle` from a cross-validated system, or pass --min-confidence",
            )
        threshold = metrics.threshold_from_scores(scores["confidence"], scores["correct"], target_accuracy)
        if threshold is None:
            best = metrics.accuracy_by_threshold(scores["confidence"], scores["correct"])[1].max()
            raise JobembedError(
                f"--target-accuracy {target_accuracy}: no confidence threshold reached it on the out-of-fold answers "
                f"(the best any threshold reached was {best:.3f})",
                fix="ask for a lower target accuracy, or pass --min-confidence",
            )
        return threshold

    def predict(
        self, texts: list[str], *, config: ClassifyConfig | None = None, progress: bool = False
    ) -> list[Prediction]:
        """Top-k labels with probabilities; below ``min_confidence`` the label is the uncertain label.

        Args:
            config: top-k and threshold; default the bundle's own ``classify`` section.
        """
        config = config or self.classify_defaults
        if config.target_accuracy is not None:
            config = config.model_copy(update={"min_confidence": self.threshold_for(config.target_accuracy)})
        if not texts:
            return []
        proba, cleaned = self.predict_proba_explained(texts, progress=progress)
        return self.decide(texts, proba, config=config, seen=None if cleaned is None else cleaned.texts)

    def decide(
        self, texts: list[str], proba: np.ndarray, *, config: ClassifyConfig, seen: list[str] | None = None
    ) -> list[Prediction]:
        """Answers from probabilities (rows in ``texts`` order): top-k, and the uncertain label below
        ``config.min_confidence`` (``target_accuracy`` already turned into it by the caller).

        Args:
            seen: what the head read (the cleaner's output), default ``texts``. A text with nothing left to read
                (``nothing_to_read``) is uncertain whatever its confidence, with a reason.
        """
        classes = np.asarray(self.head.classes_, dtype=str)
        seen = list(texts) if seen is None else seen
        out = []
        for text, read, row in zip(texts, seen, proba, strict=True):
            order = np.argsort(-row)[: config.top_k]
            top = [
                {"label": classes[i], "name": self.names.get(classes[i], ""), "probability": round(float(row[i]), 4)}
                for i in order
            ]
            best = top[0]
            reason = None
            if nothing_to_read(read):
                reason = (
                    "no words left after cleaning (the cleaner removed everything)"
                    if not nothing_to_read(text)
                    else "the text has no letters or digits"
                )
            uncertain = reason is not None or bool(best["probability"] < config.min_confidence)
            out.append(
                Prediction(
                    text=text,
                    label=config.uncertain_label if uncertain else best["label"],
                    name="" if uncertain else best["name"],
                    confidence=float(row[order[0]]),
                    uncertain=uncertain,
                    top_k=top,
                    reason=reason,
                )
            )
        return out


def read_bundle_meta(path: Path) -> BundleMeta:
    """``path/bundle.json``, validated: format version first, then the schema.

    Raises:
        BundleError: missing, not JSON, another format, or a field missing or of the wrong type.
    """
    meta_path = Path(path) / "bundle.json"
    if Path(path).is_file() and Path(path).name == "bundle.json":
        raise BundleError(
            f"{path} is the bundle's bundle.json file; a bundle is the folder that holds it",
            fix=f"pass the folder: --bundle {Path(path).parent}",
        )
    if not meta_path.is_file():
        raise BundleError(
            f"{path} is not a jobembed bundle (no bundle.json)",
            fix="pass a bundle folder, e.g. runs/NAME/bundle, made by `jobembed bundle` or head",
        )
    try:
        raw = read_json(meta_path)
    except PermissionError:
        raise BundleError(
            f"{meta_path} cannot be read by this user (uid {os.getuid()})",
            fix="make the bundle readable to it (chmod -R a+rX BUNDLE), e.g. for a container that runs as non-root",
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(
            f"{meta_path} is not valid JSON ({str(e).splitlines()[0]})", fix="re-create the bundle; do not edit it"
        ) from None
    if not isinstance(raw, dict):
        raise BundleError(
            f"{meta_path}", expected="a JSON object", found=type(raw).__name__, fix="re-create the bundle"
        )
    found = str(raw.get("format"))
    if found.split("/")[0] != _BUNDLE_NAME or found != BUNDLE_FORMAT:
        raise BundleError(
            f"{meta_path}: unsupported bundle format",
            expected=BUNDLE_FORMAT,
            found=found,
            fix="re-create the bundle with this jobembed version (jobembed run / bundle)",
        )
    try:
        return BundleMeta.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise BundleError(
            f"{meta_path}: field '{where}': {err['msg']}", fix="re-create the bundle; do not edit bundle.json"
        ) from None


def load_bundle(
    path: Path,
    *,
    device: str = "auto",
    verify: bool = True,
    backend: Literal["torch", "onnx-int8"] | None = None,
    cache: bool = True,
    memory_cache: int | None = None,
    batch_size: int | None = None,
) -> Bundle:
    """Open a bundle folder, checking its schema, format version and (with ``verify``) every file's hash.

    Args:
        backend: how to run the encoder: torch, or an int8 ONNX Runtime export (``jobembed.onnx_backend``); None:
            as the training vectors were made (the bundle's ``encoder.backend``).
        cache: False encodes every text afresh and keeps nothing (benchmarks).
        memory_cache: keep at most this many texts' vectors in memory instead of the on-disk store (a server).
        batch_size: texts per forward pass (default: ``EmbedConfig.batch_size``).
    """
    path = Path(path)
    meta = read_bundle_meta(path)
    if verify:
        if meta.meta_sha256 != meta_digest(read_json(path / "bundle.json")):
            raise BundleError(
                f"{path}: bundle.json was edited since the bundle was made (its fields no longer match meta_sha256)",
                fix="re-create the bundle (jobembed bundle RUN --force); change serving settings with classify/serve "
                "flags or a serve: config, not inside the bundle",
            )
        extra = sorted(set(_bundle_files(path)) - set(meta.files))
        if extra:
            raise BundleError(
                f"{path}: file {extra[0]} is not part of the bundle (not in bundle.json's file list)",
                fix="re-create the bundle; do not add or edit files inside it",
            )
        for rel, digest in meta.files.items():
            f = path / rel
            if not f.is_file() or file_sha256(f) != digest:
                raise BundleError(
                    f"{path}: file {rel} is missing or changed since the bundle was made",
                    fix="re-create the bundle; do not edit files inside it",
                )
    head = load_head(path / meta.head.path, meta.head.kind, device=device)
    try:
        labels = pd.DataFrame(read_json(path / "labels.json"), columns=["label", "name", "description"])
    except (OSError, ValueError) as e:
        raise BundleError(f"{path / 'labels.json'} is unreadable ({e})", fix="re-create the bundle") from None
    labels = labels.fillna("").astype(str)
    missing = sorted(set(meta.classes) - set(labels["label"]))
    if missing:
        raise BundleError(f"{path}: labels.json lacks class {missing[0]!r} of the head", fix="re-create the bundle")
    return Bundle(
        path,
        meta,
        head,
        labels,
        device=device,
        backend=backend or meta.encoder.backend,
        cache=cache,
        memory_cache=memory_cache,
        batch_size=batch_size,
    )


def find_latest_bundle(runs_dir: Path) -> Path:
    """The newest ``bundle`` (or ``head``) folder under ``runs_dir``, by the time it was written."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise JobembedError(f"--runs-dir {runs_dir} is a file", fix="pass the folder that holds your runs, or --bundle")
    candidates = [p.parent for p in runs_dir.glob("*/*/bundle.json")]
    if not candidates:
        raise BundleError(
            f"no bundle found under {runs_dir}/",
            fix="run `jobembed run --config configs/demo.yaml` first, or pass --bundle DIR",
        )
    return max(candidates, key=lambda p: (p / "bundle.json").stat().st_mtime)
