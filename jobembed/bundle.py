"""The deployable bundle: everything ``classify`` (and later ``serve``) needs, in one folder.

```
bundle/
  bundle.json      format tag, system, encoder reference + fingerprint + prompt, file hashes, metrics
  head/            head.safetensors + head.json (MLP head or cosine prototypes); never pickle
  labels.json      label, name, description for every class
  config.yaml      the resolved pipeline config that produced it
  encoder/         optional copy of a local encoder folder (``copy_encoder=True``)
```
Loading checks the format version, every file hash, and that the encoder still has the fingerprint the
head was trained on: a head on vectors from another encoder would answer confidently and wrongly.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobembed import __version__, encoders
from jobembed.artifacts import file_sha256, read_json, write_json
from jobembed.baselines import CosineClassifier
from jobembed.config import ClassifyConfig, EmbedConfig, PipelineConfig, write_resolved
from jobembed.errors import BundleError
from jobembed.head import MLPHead

BUNDLE_FORMAT = "jobembed-bundle/1"


def save_bundle(
    out_dir: Path,
    *,
    model: MLPHead | CosineClassifier,
    system: str,
    encoder: str,
    config: PipelineConfig,
    labels: pd.DataFrame,
    metrics: dict[str, Any] | None = None,
    copy_encoder: bool = False,
) -> Path:
    """Write a bundle folder (replacing an older one atomically).

    Args:
        model: a fitted MLPHead or cosine classifier on ``encoder``'s vectors.
        system: the system name it came from (``mlp``, ``centroid``, ``zeroshot``).
        encoder: the model reference the vectors came from.
        labels: frame with ``label``, ``name``, ``description``.
        copy_encoder: copy a local/builtin encoder folder into the bundle, for machines without the cache.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "head")
    write_json(tmp / "labels.json", labels[["label", "name", "description"]].to_dict(orient="records"))
    write_resolved(config, tmp)
    embed = config.embed.model_copy(update={"model": encoder})
    text_prompt, _ = encoders.resolve_prompts(encoder, embed.text_prompt, embed.label_prompt)
    ref = encoder
    if copy_encoder:
        resolved = encoders.resolve(encoder, cache_dir=embed.cache_dir)
        if resolved.kind == "hub":
            raise BundleError(
                f"cannot copy hub model {encoder!r} into the bundle",
                fix="save it locally first (SentenceTransformer(...).save(DIR)) and pass that folder",
            )
        shutil.copytree(resolved.location, tmp / "encoder")
        ref = "./encoder"
    files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(
        tmp / "bundle.json",
        {
            "format": BUNDLE_FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "jobembed_version": __version__,
            "system": system,
            "head": {"kind": "mlp" if isinstance(model, MLPHead) else "cosine", "path": "head"},
            "encoder": {
                "ref": ref,
                "source_ref": encoder,
                "fingerprint": encoders.model_fingerprint(encoder, cache_dir=embed.cache_dir),
                "text_prompt": text_prompt,
                "max_seq_length": embed.max_seq_length,
            },
            "classes": [str(c) for c in model.classes_],
            "files": files,
            "metrics": metrics or {},
        },
    )
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


@dataclass
class Prediction:
    """One text's answer: the top label (or the uncertain label) and the top-k alternatives."""

    text: str
    label: str
    name: str
    confidence: float
    top_k: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "confidence": round(self.confidence, 4), "top_k": self.top_k}


class Bundle:
    """A loaded bundle; ``predict`` embeds texts with the bundle's encoder and applies the head."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        head: MLPHead | CosineClassifier,
        labels: pd.DataFrame,
        *,
        device: str = "auto",
    ) -> None:
        self.path, self.meta, self.head, self.labels, self.device = path, meta, head, labels, device
        self.names = dict(zip(labels["label"].astype(str), labels["name"].astype(str), strict=True))
        self._embedder = None

    @property
    def encoder_ref(self) -> str:
        ref = self.meta["encoder"]["ref"]
        return str(self.path / ref) if ref.startswith("./") else ref

    @property
    def embedder(self):
        """The cached embedder for the bundle's encoder; checks the fingerprint on first use."""
        if self._embedder is None:
            from jobembed.embed import Embedder

            enc = self.meta["encoder"]
            cfg = EmbedConfig(
                model=self.encoder_ref,
                text_prompt=enc["text_prompt"],
                label_prompt=None,
                max_seq_length=enc["max_seq_length"],
                device=self.device,
            )
            embedder = Embedder(cfg, prompt=enc["text_prompt"])
            if embedder.fingerprint != enc["fingerprint"]:
                raise BundleError(
                    f"{self.path}: the encoder {self.encoder_ref!r} is not the one the head was trained on",
                    expected=f"fingerprint {enc['fingerprint']}",
                    found=embedder.fingerprint,
                    fix="use the same model files, or re-create the bundle with copy_encoder",
                )
            self._embedder = embedder
        return self._embedder

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(n, n_classes) probabilities, columns in ``self.head.classes_`` order."""
        return self.head.predict_proba(self.embedder.encode(texts))

    def predict(self, texts: list[str], *, config: ClassifyConfig | None = None) -> list[Prediction]:
        """Top-k labels with probabilities; below ``min_confidence`` the label is the uncertain label."""
        config = config or ClassifyConfig()
        proba = self.predict_proba(texts) if texts else np.zeros((0, len(self.head.classes_)))
        classes = np.asarray(self.head.classes_, dtype=str)
        out = []
        for text, row in zip(texts, proba, strict=True):
            order = np.argsort(-row)[: config.top_k]
            top = [
                {"label": classes[i], "name": self.names.get(classes[i], ""), "probability": round(float(row[i]), 4)}
                for i in order
            ]
            best = top[0]
            uncertain = best["probability"] < config.min_confidence
            out.append(
                Prediction(
                    text=text,
                    label=config.uncertain_label if uncertain else best["label"],
                    name="" if uncertain else best["name"],
                    confidence=float(row[order[0]]),
                    top_k=top,
                )
            )
        return out


def load_bundle(path: Path, *, device: str = "auto", verify: bool = True) -> Bundle:
    """Open a bundle folder, checking format version and file hashes."""
    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(
            f"{path} is not a jobembed bundle (no bundle.json)",
            fix="pass a bundle folder, e.g. runs/NAME/bundle, made by compare-report or train-head",
        )
    meta = read_json(meta_path)
    found = str(meta.get("format"))
    if found != BUNDLE_FORMAT:
        raise BundleError(
            f"{meta_path}: unsupported bundle format",
            expected=BUNDLE_FORMAT,
            found=found,
            fix="re-create the bundle with this jobembed version (jobembed run / train-head)",
        )
    if verify:
        for rel, digest in meta.get("files", {}).items():
            f = path / rel
            if not f.is_file() or file_sha256(f) != digest:
                raise BundleError(
                    f"{path}: file {rel} is missing or changed since the bundle was made",
                    fix="re-create the bundle; do not edit files inside it",
                )
    head_dir = path / meta["head"]["path"]
    head = MLPHead.load(head_dir, device=device) if meta["head"]["kind"] == "mlp" else CosineClassifier.load(head_dir)
    labels = pd.DataFrame(read_json(path / "labels.json"))
    return Bundle(path, meta, head, labels, device=device)


def find_latest_bundle(runs_dir: Path) -> Path:
    """The newest ``bundle`` (or ``head``) folder under ``runs_dir``, by the time it was written."""
    candidates = [p.parent for p in Path(runs_dir).glob("*/*/bundle.json")]
    if not candidates:
        raise BundleError(
            f"no bundle found under {runs_dir}/", fix="run `jobembed run configs/demo.yaml` first, or pass --bundle DIR"
        )
    return max(candidates, key=lambda p: (p / "bundle.json").stat().st_mtime)
