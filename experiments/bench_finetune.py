"""Fine-tuning speed: plain `SentenceTransformerTrainer` (default settings) vs the trainer `jobembed finetune` builds,
same triplets, architecture, batch size, max length, precision and loss (MNRL), in one script on one machine.

    # here (CPU, a tiny random-init XLM-R shape with the e5 tokenizer):
    .venv/bin/python experiments/bench_finetune.py --shape tiny --batch 32 --max-len 128 --steps 12

    # GPU: first, here, put what the device machine lacks into ignored folders that `run` can carry
    .venv/bin/python experiments/bench_finetune.py --prepare-carry        # .bench/: tokenizer + triplet texts
    # (wheels: datasets, dill, multiprocess, pydantic, pydantic-core, annotated-types, typing-inspection; see
    #  docs/benchmarks.md#fine-tuning for the pip download line), then on the device:
    python3 experiments/bench_finetune.py --shape xlmr-base --batch 64 128 --max-len 256 --precision bf16 \\
        --tokenizer .bench/tokenizer --texts .bench/triplets.parquet --steps 30 --json $OUT/bench_finetune.json

No weights are loaded anywhere: the encoder is built from its config with random initialisation (speed does not
depend on the weights), the tokenizer is the e5 one (XLM-R's 250k vocabulary). Each setting runs in its own process
(its own peak memory, no compile cache carried over); the first `--warmup` steps are not timed.

Settings: `plain` (SentenceTransformerTrainer, MultipleNegativesRankingLoss, prompts through the trainer, the data
collator tokenising every batch); `jobembed` (FinetuneConfig's defaults: texts tokenised once up front, batches
padded to a multiple of 8 on CUDA); then one lever at a time on top of it: `+workers` (4 data loader workers),
`+group` (length-grouped batches), `+compile` (torch.compile), and `+all`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "plain": None,
    "jobembed": {},
    "+workers": {"dataloader_workers": 4},
    "+group": {"group_by_length": True},
    "+compile": {"compile": True},
    "+all": {"dataloader_workers": 4, "group_by_length": True, "compile": True},
}
SHAPES = {
    # XLM-R base (paraphrase-multilingual-mpnet-base-v2 and multilingual-e5-base have this shape)
    "xlmr-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "e5-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 1536},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512},
}
PROMPT = "query: "


def _default_tokenizer() -> Path:
    sys.path.insert(0, str(ROOT))
    from jobembed import encoders

    return Path(encoders.resolve("builtin:multilingual-e5-small").location)


def _default_texts():
    import pandas as pd

    found = sorted((ROOT / "experiments" / "out").glob("*/triplets/train.parquet"))
    if found:
        return pd.read_parquet(found[0], columns=["anchor", "positive", "negative"])
    # no pl-jobads run here: ads of realistic lengths from a fixed vocabulary
    import numpy as np

    rng = np.random.default_rng(0)
    words = [f"słowo{i}" for i in range(5000)]
    make = lambda: " ".join(rng.choice(words, size=int(rng.integers(20, 400))))  # noqa: E731
    return pd.DataFrame({c: [make() for _ in range(2000)] for c in ("anchor", "positive", "negative")})


def prepare_carry() -> None:
    """Copy the tokenizer and the triplet texts into .bench/ (ignored by git, small enough to carry)."""
    import shutil

    out = ROOT / ".bench"
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    src = _default_tokenizer()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / "tokenizer" / name)
    _default_texts().to_parquet(out / "triplets.parquet")
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB")


def build_model(shape: str, tokenizer_dir: Path, max_len: int, device: str):
    """A random-init XLM-R-shaped SentenceTransformer (mean pooling, normalised) with the e5 tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    folder = Path(tempfile.mkdtemp()) / "hf"
    XLMRobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformer = Transformer(str(folder), max_seq_length=max_len)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()]
    return SentenceTransformer(modules=modules, device=device)


def one(args) -> dict:
    """Time one setting in this process; print its JSON line."""
    import pandas as pd
    import torch
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    sys.path.insert(0, str(ROOT))
    from jobembed.finetune import speed_settings
    from jobembed.sections import FinetuneConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.shape, Path(args.tokenizer or _default_tokenizer()), args.max_len, device)
    texts = pd.read_parquet(args.texts) if args.texts else _default_texts()
    need = args.batch_size * (args.steps + args.warmup)
    frame = pd.concat([texts] * (need // len(texts) + 1), ignore_index=True).iloc[:need]
    lever = SETTINGS[args.setting]
    if lever is None:  # the plain trainer
        speed = {"data_collator": None, "batch_sampler": None, "prompts": PROMPT, "torch_compile": False}
        workers = 0
    else:
        config = FinetuneConfig(**lever)
        speed = speed_settings(model, frame, config=config, device=device, text_prompt=PROMPT)
        workers = config.dataloader_workers
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    extra = {"batch_sampler": speed["batch_sampler"]} if speed["batch_sampler"] else {}
    training = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps + args.warmup,
        per_device_train_batch_size=args.batch_size,
        learning_rate=3e-5,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        use_cpu=device == "cpu",
        prompts=speed["prompts"],
        torch_compile=speed["torch_compile"],
        dataloader_num_workers=workers,
        **extra,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training,
        train_dataset=Dataset.from_pandas(frame, preserve_index=False),
        loss=MultipleNegativesRankingLoss(model),
        data_collator=speed["data_collator"],
        callbacks=[Clock()],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    timed = marks[args.warmup - 1 :] if args.warmup else [started, *marks]
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    result = {
        "setting": args.setting,
        "batch": args.batch_size,
        "triplets_per_s": round(steps * args.batch_size / seconds, 2),
        "step_ms": round(1000 * seconds / steps, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "peak_rss_gb": round(_peak_rss_gb(), 2),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, caches)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder [default: the builtin e5's]")
    parser.add_argument("--texts", default=None, help="a Parquet with anchor, positive, negative")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--prepare-carry", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_carry:
        return prepare_carry()
    if args.one:
        args.setting = args.one
        one(args)
        return None
    import torch

    where = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    results = []
    for batch in args.batch:
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--one", setting, "--batch-size", str(batch)]
            for flag in ("shape", "max_len", "precision", "steps", "warmup", "tokenizer", "texts"):
                value = getattr(args, flag)
                if value is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(value)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{setting} batch {batch}: failed\n{done.stderr[-1500:]}", flush=True)
                results.append({"setting": setting, "batch": batch, "failed": done.stderr[-300:]})
                continue
            results.append(json.loads(lines[-1][7:]))
            print(json.dumps(results[-1]), flush=True)
    head = (
        f"{where}, {date.today()}; {args.shape} shape (random init), {args.max_len} tokens, {args.precision}, MNRL; "
        f"{args.steps} timed steps after {args.warmup}"
    )
    lines = [
        head,
        "",
        "| batch | setting | triplets/s | × plain | step ms | peak GPU mem GB | peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch:
        rows = [r for r in results if r["batch"] == batch]
        plain = next((r["triplets_per_s"] for r in rows if r["setting"] == "plain" and "failed" not in r), None)
        for r in rows:
            if "failed" in r:
                lines.append(f"| {batch} | {r['setting']} | failed | | | | |")
                continue
            ratio = f"{r['triplets_per_s'] / plain:.2f}" if plain else ""
            mem = "" if r["peak_mem_gb"] is None else r["peak_mem_gb"]
            cells = [batch, r["setting"], r["triplets_per_s"], ratio, r["step_ms"], mem, r["peak_rss_gb"]]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "args": vars(args), "results": results}, indent=2))
    return None


if __name__ == "__main__":
    main()
