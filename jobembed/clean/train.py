"""``jobembed clean train``: adapt a GLiNER2 extractor to a portal's own gold spans with gliner2's
``GLiNER2Trainer``.

For users whose language or taxonomy the public model covers poorly (``fastino/gliner2-multi-v1`` lists
French, English, Spanish, German, Italian and Portuguese, not Danish). It starts from an existing GLiNER2
(``--from``) or builds a new one on any sentence encoder (``--encoder builtin:multilingual-e5-small``),
maps the gold labels onto the schema's entity types (``--label-map skill=kompetence``), windows long
documents in the encoder's own tokens (as extraction does), holds out a share of the documents for
choosing the best epoch, and saves a GLiNER2 folder with a ``jobembed-extractor.json`` sidecar (format tag,
where it came from, the gold file's hash, held-out span scores) and its content fingerprint.

Data contract: the gold JSONL as ``jobembed.clean.spans.read_gold_jsonl`` reads it.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobembed import encoders
from jobembed.artifacts import file_sha256, write_json
from jobembed.clean.core import resolved_schema
from jobembed.clean.gliner import Extractor, build_from_encoder, load_gliner
from jobembed.clean.spans import GoldDoc, Span, read_gold_jsonl, span_scores
from jobembed.errors import ConfigError, DataError
from jobembed.fingerprint import folder_fingerprint
from jobembed.sections import CleanConfig

EXTRACTOR_FORMAT = "jobembed-extractor/1"
SIDECAR = "jobembed-extractor.json"
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def map_labels(docs: Sequence[GoldDoc], label_map: Mapping[str, str], types: Sequence[str]) -> list[GoldDoc]:
    """Gold spans relabelled onto the schema's entity types; a label with no target is an error."""
    out = []
    for doc in docs:
        spans = []
        for s in doc.spans:
            target = label_map.get(s.label, s.label)
            if target not in types:
                raise ConfigError(
                    f"gold label {s.label!r} (document {doc.id}) is not an entity type of the schema",
                    expected=f"one of {', '.join(types)}",
                    fix=f"map it with --label-map {s.label}=<type>",
                )
            spans.append(Span(s.start, s.end, target, s.text))
        out.append(GoldDoc(doc.id, doc.text, tuple(spans)))
    return out


def _windowed_examples(extractor: Extractor, docs: Sequence[GoldDoc], types: Sequence[str], descriptions: dict):
    """gliner2 ``InputExample``s, one per window; a span crossing a window's edge is whole in the next."""
    from gliner2 import InputExample

    examples = []
    for doc in docs:
        for w in extractor.windows(doc.text):
            ents: dict[str, list[dict[str, Any]]] = {t: [] for t in types}
            for s in doc.spans:
                if s.start >= w.start_char and s.end <= w.end_char:
                    ents[s.label].append(
                        {
                            "text": doc.text[s.start : s.end],
                            "start": s.start - w.start_char,
                            "end": s.end - w.start_char,
                        }
                    )
            examples.append(InputExample(text=w.text, entities=ents, entity_descriptions=descriptions))
    return examples


def split_docs(docs: Sequence[GoldDoc], *, val_fraction: float, seed: int) -> tuple[list[GoldDoc], list[GoldDoc]]:
    """``(train, val)``: a seeded shuffle, ``val_fraction`` of the documents held out (none below 10 documents)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) >= 10 and val_fraction > 0 else 0
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def choose_threshold(model, val_docs: Sequence[GoldDoc], *, config: CleanConfig) -> tuple[float | None, dict]:
    """The span threshold with the best exact-match micro-F1 on held-out documents, and every threshold's scores.

    One extraction at the lowest threshold; each higher threshold keeps the spans scoring at least that much (the
    decoder is greedy by score within a type, so this matches a re-extraction closely).
    """
    if not val_docs:
        return None, {}
    entities, _ = resolved_schema(config)
    extractor = Extractor(
        model,
        entities=entities,
        threshold=min(THRESHOLDS),
        window_tokens=config.window_tokens,
        window_overlap=config.window_overlap,
        batch_size=config.batch_size,
    )
    found = extractor.extract([d.text for d in val_docs])
    gold = [list(d.spans) for d in val_docs]
    labels = sorted({s.label for d in val_docs for s in d.spans})
    sweep = {
        t: span_scores(gold, [[Span(s.start, s.end, s.label, s.text) for s in doc if s.score >= t] for doc in found],
                       labels=labels)
        for t in THRESHOLDS
    }  # fmt: skip
    best = max(THRESHOLDS, key=lambda t: (sweep[t]["exact"]["micro"]["f1"], -abs(t - 0.5)))
    return best, sweep


def train_extractor(
    *,
    gold_path: Path,
    out_dir: Path,
    config: CleanConfig,
    encoder: str | None = None,
    start_from: str | None = None,
    label_map: Mapping[str, str] | None = None,
    epochs: int = 10,
    batch_size: int = 8,
    encoder_lr: float = 3e-5,
    task_lr: float = 5e-4,
    val_fraction: float = 0.1,
    seed: int = 13,
    device: str = "auto",
) -> dict[str, Any]:
    """Train and save a GLiNER2 extractor; returns the sidecar's content.

    Args:
        gold_path: training JSONL with character-offset spans.
        out_dir: where the model folder goes (replaced if it exists).
        config: the ``clean`` section: language preset / entities (names, descriptions), windows.
        encoder: build a new GLiNER2 on this sentence encoder (builtin, folder or Hub id); or
        start_from: continue from this GLiNER2 (folder or Hub id).
        label_map: gold label -> entity type.
        val_fraction: share of documents held out to pick the best epoch (by held-out loss) and report
            held-out span scores.
    """
    if (encoder is None) == (start_from is None):
        raise ConfigError("clean train needs exactly one starting point", fix="pass --encoder or --from, not both")
    from gliner2.processor import SamplingConfig
    from gliner2.training import GLiNER2Trainer, TrainingConfig

    entities, _ = resolved_schema(config)
    types = [e["name"] for e in entities]
    descriptions = {e["name"]: e.get("description") or e["name"] for e in entities}
    docs = map_labels(read_gold_jsonl(gold_path), label_map or {}, types)
    if not any(d.spans for d in docs):
        raise DataError(f"{gold_path} has no gold spans", fix="pass a JSONL whose documents have spans")
    train_docs, val_docs = split_docs(docs, val_fraction=val_fraction, seed=seed)

    dev = encoders.pick_device(device)
    if encoder is not None:
        resolved = encoders.resolve(encoder)
        if resolved.kind == "hub":
            from huggingface_hub import snapshot_download

            source_dir = Path(snapshot_download(resolved.location, revision=resolved.revision))
        else:
            source_dir = Path(resolved.location)
        model = build_from_encoder(source_dir, seed=seed)
        origin = {"encoder": resolved.ref, "encoder_fingerprint": encoders.fingerprint_of(resolved)}
    else:
        model, resolved = load_gliner(start_from, device="cpu")
        origin = {"from": resolved.ref, "from_fingerprint": encoders.fingerprint_of(resolved)}
    # gliner2 renames 20% of training labels to "entity 1..n" by default (for zero-shot generality); a
    # portal's fixed schema gains nothing from it.
    model.processor.sampling_config = SamplingConfig(synthetic_entity_label_prob=0.0)
    windower = Extractor(
        model,
        entities=entities,
        threshold=config.threshold or 0.5,
        window_tokens=config.window_tokens,
        window_overlap=config.window_overlap,
    )
    train_examples = _windowed_examples(windower, train_docs, types, descriptions)
    val_examples = _windowed_examples(windower, val_docs, types, descriptions) if val_docs else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jobembed-gliner-train-") as work:
        tc = TrainingConfig(
            output_dir=work,
            num_epochs=epochs,
            batch_size=batch_size,
            encoder_lr=encoder_lr,
            task_lr=task_lr,
            eval_strategy="epoch" if val_examples else "no",
            save_best=bool(val_examples),
            save_total_limit=1,
            num_workers=0,
            pin_memory=dev.startswith("cuda"),
            fp16=dev.startswith("cuda"),
            seed=seed,
            logging_steps=10,
        )
        trainer = GLiNER2Trainer(model.to(dev), tc)
        summary = trainer.train(train_data=train_examples, eval_data=val_examples)
        best = Path(work) / ("best" if (Path(work) / "best").is_dir() else "final")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(best, out_dir)
    seconds = time.perf_counter() - started
    trained, _ = load_gliner(str(out_dir), device=dev)
    threshold, sweep = choose_threshold(trained, val_docs, config=config)
    val_scores = sweep.get(threshold)
    sidecar = {
        "format": EXTRACTOR_FORMAT,
        **origin,
        "gold": {"path": str(gold_path), "sha256": file_sha256(gold_path), "docs": len(docs)},
        "label_map": dict(label_map or {}),
        "entities": entities,
        "split": {"train_docs": len(train_docs), "val_docs": len(val_docs), "train_windows": len(train_examples)},
        "training": {"epochs": epochs, "batch_size": batch_size, "encoder_lr": encoder_lr, "task_lr": task_lr,
                     "seed": seed, "device": dev, "seconds": round(seconds, 1),
                     "best": best.name, "steps": summary.get("total_steps") if isinstance(summary, dict) else None},
        "val_scores": val_scores,
        "threshold": threshold,
        "threshold_sweep": {str(t): {m: sweep[t][m]["micro"]["f1"] for m in ("exact", "overlap")} for t in sweep},
    }  # fmt: skip
    write_json(out_dir / SIDECAR, sidecar)
    sidecar["fingerprint"] = folder_fingerprint(out_dir)
    return sidecar
