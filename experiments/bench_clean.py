"""Benchmark: GLiNER2 extraction one text at a time (the original project's way) vs gliner2's own
``batch_extract_entities`` vs ``jobembed clean`` (windows in subword tokens, length-sorted batches, half
precision on a GPU), on whole Polish ads of pl-jobads, in one run on one machine.

    # 1. here (needs ../shared/data and the builtin e5 folder): a small kit that can travel to a GPU machine
    .venv/bin/python experiments/bench_clean.py kit
    # 2a. on a GPU (random-init mdeberta-v3-base shape, as the anchor: 16 ads/s one at a time on an H200)
    python experiments/bench_clean.py run --shape mdeberta-v3-base --device cuda --n 2000 --baseline-n 300
    # 2b. on this 2-core CPU, with a real extractor trained by `jobembed clean train` (or a random e5-small shape)
    .venv/bin/python experiments/bench_clean.py run --model runs/gliner-da --device cpu --n 200 --baseline-n 40

No weights reach the GPU machine, so ``--shape`` builds the encoder from its architecture alone (random
init; the same arithmetic) with the e5 tokenizer of the kit (XLM-R's 250k SentencePiece vocabulary, the one
mdeberta-v3 and e5 share in size). A random GLiNER2 emits floods of junk spans at threshold 0.5, which makes
decoding (Python work per span) unrealistically slow, so the model is first trained ``--train-steps`` steps
on the kit's da-kompetencer gold spans (a few hundred real Danish job-posting sentences); the spans per ad
printed beside each timing show the decoding load is the same for every variant.

Whole ads: mdeberta has relative positions, so one call per whole ad works there; an absolute-position
encoder (e5, BERT) crashes on ads past 512 tokens, so for ``--shape e5-small`` and ``--model`` the two
gliner2 baselines get each ad cut to its first window (they do less work than jobembed, which reads the
whole ad): the characters/s column is the fair comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
KIT = HERE / "out" / "clean_kit"
ENTITIES = [
    {"name": "occupation", "description": "job title or occupation"},
    {"name": "skill", "description": "skill, knowledge, education, licence or tool the job requires"},
    {"name": "task", "description": "task or duty performed in the job"},
]


def make_kit(n_ads: int = 3000) -> None:
    """Tokenizer files of the builtin e5, ``n_ads`` whole pl-jobads ads and the da-kompetencer train gold."""
    import pandas as pd

    from jobembed.builtin_e5 import ensure_builtin_e5

    data = ROOT.parent / "shared" / "data"
    KIT.mkdir(parents=True, exist_ok=True)
    e5 = Path(ensure_builtin_e5())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"):
        if (e5 / name).is_file():
            shutil.copy2(e5 / name, KIT / name)
    ads = pd.read_csv(data / "pl-jobads" / "ads.csv", dtype=str, keep_default_na=False)
    ads = ads[ads["text"].str.len() > 0].sample(n=n_ads, random_state=0)
    (KIT / "ads.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ads["text"]) + "\n")
    shutil.copy2(data / "da-kompetencer" / "train.jsonl", KIT / "gold.jsonl")
    size = sum(p.stat().st_size for p in KIT.iterdir()) / 1e6
    print(f"kit: {KIT} ({size:.1f} MB): carry experiments/out/clean_kit to the GPU machine")


def build_random(shape: str, folder: Path):
    """A random-init encoder of ``shape`` with the kit's tokenizer, saved as an HF folder, as a GLiNER2."""
    from transformers import AutoTokenizer, BertConfig, BertModel, DebertaV2Config, DebertaV2Model

    from jobembed.clean.gliner import build_from_encoder

    tok = AutoTokenizer.from_pretrained(KIT)
    if shape == "mdeberta-v3-base":
        config = DebertaV2Config(
            vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, relative_attention=True, position_buckets=256,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            layer_norm_eps=1e-7, max_relative_positions=-1, type_vocab_size=0, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        model = DebertaV2Model(config)
    elif shape == "e5-small":
        config = BertConfig(
            vocab_size=len(tok), hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        model = BertModel(config)
    else:
        raise SystemExit(f"unknown --shape {shape}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return build_from_encoder(folder)


def train_steps(model, steps: int, device: str) -> float:
    """A few steps of gliner2's own trainer on the kit's gold, so the random model's spans are not floods."""
    from gliner2 import InputExample
    from gliner2.processor import SamplingConfig
    from gliner2.training import GLiNER2Trainer, TrainingConfig

    from jobembed.clean.spans import read_gold_jsonl

    docs = read_gold_jsonl(KIT / "gold.jsonl")
    examples = [
        InputExample(
            text=d.text,
            entities={"skill": [{"text": s.text, "start": s.start, "end": s.end} for s in d.spans], "occupation": []},
        )
        for d in docs
    ]
    model.processor.sampling_config = SamplingConfig(synthetic_entity_label_prob=0.0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(
            output_dir=out, max_steps=steps, batch_size=8, num_workers=0, eval_strategy="no", save_best=False,
            logging_steps=max(1, steps // 2), task_lr=1e-3, encoder_lr=5e-5, warmup_ratio=0.0,
            pin_memory=False, fp16=device.startswith("cuda"),
        )  # fmt: skip
        GLiNER2Trainer(model.to(device), cfg).train(train_data=examples)
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> None:
    import torch

    from jobembed.clean.gliner import Extractor, gliner_schema, load_gliner

    random.seed(0)
    torch.manual_seed(0)
    device = args.device
    texts = [json.loads(line)["text"] for line in (KIT / "ads.jsonl").read_text().splitlines()][: args.n]
    info: dict = {"device": device, "n": len(texts), "threshold": args.threshold}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, _ = load_gliner(args.model, device=device)
            info["model"] = args.model
        else:
            model = build_random(args.shape, Path(tmp) / "encoder")
            info["shape"] = args.shape
            info["train_steps"] = args.train_steps
            info["train_seconds"] = round(train_steps(model, args.train_steps, device), 1) if args.train_steps else 0
    model = model.to(device).eval()
    entities = ENTITIES
    sidecar = Path(args.model or "") / "jobembed-extractor.json"
    if args.model and sidecar.is_file():  # a trained extractor knows only its own entity types
        entities = json.loads(sidecar.read_text())["entities"]
    info["entities"] = [e["name"] for e in entities]
    schema = gliner_schema(entities, args.threshold)
    probe = Extractor(model, entities=entities, threshold=args.threshold, window_tokens=args.window_tokens)
    relative = probe.budget >= args.window_tokens and "deberta" in model.encoder.config.model_type
    # Baselines read whole ads where the encoder allows it (mdeberta), else each ad's first window.
    base_texts = texts[: args.baseline_n]
    if not relative:
        base_texts = [probe.windows(t)[0].text for t in base_texts]
    info["baseline_input"] = "whole ads" if relative else "first window of each ad (absolute positions)"
    rows = []

    def record(name: str, docs: list[str], fn) -> None:
        fn(docs[:4])  # warm-up (CUDA kernels, tokenizer caches)
        _sync(device)
        started = time.perf_counter()
        spans = fn(docs)
        _sync(device)
        sec = time.perf_counter() - started
        chars = sum(map(len, docs))
        row = {
            "variant": name,
            "texts": len(docs),
            "seconds": round(sec, 2),
            "texts_per_s": round(len(docs) / sec, 1),
            "chars_per_s": round(chars / sec),
            "spans_per_text": round(spans / len(docs), 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def count(results) -> int:
        return sum(len(v or []) for r in results for v in (r.get("entities") or {}).values())

    with torch.inference_mode():
        record(
            "gliner2 one at a time (fp32)",
            base_texts,
            lambda d: count(
                [model.extract_entities(t, schema, threshold=args.threshold, include_spans=True) for t in d]
            ),
        )
        record(
            "gliner2 batch_extract_entities (fp32, batch 8)",
            base_texts,
            lambda d: count(model.batch_extract_entities(d, schema, batch_size=8, threshold=args.threshold,
                                                         include_spans=True)),
        )  # fmt: skip
        for precision in ["fp32", "fp16"] if device.startswith("cuda") else ["fp32"]:
            m = model.half() if precision == "fp16" else model.float()
            for batch in args.batch_sizes:
                ex = Extractor(m, entities=entities, threshold=args.threshold, window_tokens=args.window_tokens,
                               window_overlap=args.window_tokens // 8, batch_size=batch)  # fmt: skip
                record(
                    f"jobembed clean ({precision}, batch {batch}, windows {ex.budget} tokens)",
                    texts,
                    lambda d, ex=ex: sum(len(s) for s in ex.extract(d)),
                )
    base = rows[0]
    for r in rows:
        r["texts_ratio"] = round(r["texts_per_s"] / base["texts_per_s"], 2)
        r["chars_ratio"] = round(r["chars_per_s"] / base["chars_per_s"], 2)
    print(json.dumps({"info": info}))
    print(f"\n{json.dumps(info)}\n")
    print("| variant | texts | s | texts/s | chars/s | spans/text | × one-at-a-time (texts) | × (chars) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['texts']} | {r['seconds']} | {r['texts_per_s']} | {r['chars_per_s']:,} | "
            f"{r['spans_per_text']} | {r['texts_ratio']} | {r['chars_ratio']} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"info": info, "rows": rows}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    kit = sub.add_parser("kit")
    kit.add_argument("--n-ads", type=int, default=3000)
    r = sub.add_parser("run")
    r.add_argument("--shape", default="mdeberta-v3-base", choices=["mdeberta-v3-base", "e5-small"])
    r.add_argument("--model", help="a trained GLiNER2 folder instead of a random shape")
    r.add_argument("--device", default="cuda")
    r.add_argument("--n", type=int, default=2000)
    r.add_argument("--baseline-n", type=int, default=300)
    r.add_argument("--threshold", type=float, default=0.5)
    r.add_argument("--window-tokens", type=int, default=384)
    r.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32])
    r.add_argument("--train-steps", type=int, default=60)
    r.add_argument("--json-out")
    args = parser.parse_args()
    make_kit(args.n_ads) if args.cmd == "kit" else run(args)


if __name__ == "__main__":
    main()
