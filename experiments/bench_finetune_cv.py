"""What the fine-tuning recipe inside the CV (finetune-cv) costs per fold, and what 5 folds at 10,000 triplets would.

    # here (CPU, tiny random-init shape, a few hundred ads): checks the path, figures are not for the docs
    .venv/bin/python experiments/bench_finetune_cv.py --prepare-carry              # .bench/cv: ads, labels
    .venv/bin/python experiments/bench_finetune_cv.py --shape tiny --rows 400 --triplets 64 --max-len 64
    # on a lent GPU: experiments/gpu_finetune_cv.sh (random-init e5-small shape, bf16, 256 tokens)

A random-init encoder of the given shape (no weights reach the GPU machine) with the e5 tokenizer; pl-jobads ads
(isco_submajor, a stratified sample of ``--rows``); prepare -> clean (rules) -> embed -> finetune-cv without a judge
(a random encoder's neighbours are noise), ``--triplets`` per fold, ``--folds`` folds. Per fold it reports mining,
fine-tuning and re-encoding time (from each fold's fold.json and the stage's wall time), and the ratio of the plain
``SentenceTransformer`` load + ``encode`` of the dev pool to jobembed's re-encode on the same fold model (same
texts, prompt and batch size; jobembed's also encodes the category texts). The last line extrapolates to 5 folds at
10,000 triplets at the measured length: fine-tuning scales with triplets, the rest with ads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
CARRY = ROOT / ".bench" / "cv"


def prepare_carry() -> None:
    """A stratified sample of pl-jobads and its labels in .bench/cv (git-ignored, small enough to carry)."""
    import pandas as pd
    from bench_finetune import prepare_carry as tokenizer_carry
    from common import DATA

    tokenizer_carry()  # .bench/tokenizer (and the triplet texts bench_finetune reads)
    CARRY.mkdir(parents=True, exist_ok=True)
    ads = pd.read_csv(DATA / "pl-jobads" / "ads.csv")
    ads = ads.sample(n=min(4000, len(ads)), random_state=13)  # prepare's --max-rows then stratifies
    ads[["id", "text", "isco_submajor"]].to_parquet(CARRY / "ads.parquet", index=False)
    shutil.copy(DATA / "pl-jobads" / "labels.csv", CARRY / "labels.csv")
    print(f"wrote {CARRY}: {len(ads)} ads, {sum(f.stat().st_size for f in CARRY.iterdir()) / 1e6:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare-carry", action="store_true")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "e5-small", "xlmr-base"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--triplets", type=int, default=64, help="per fold")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokenizer", default=str(ROOT / ".bench" / "tokenizer"))
    ap.add_argument("--work", default="/tmp/bench-finetune-cv")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.prepare_carry:
        prepare_carry()
        return

    import pandas as pd
    from bench_finetune import build_model

    from jobembed.config import load_config
    from jobembed.stages import pin_models, run_stages

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, Path(args.tokenizer), args.max_len, args.device)
    model.save(str(work / "encoder"))
    build_s = time.perf_counter() - t0
    ads = pd.read_parquet(CARRY / "ads.parquet")
    ads.to_csv(work / "ads.csv", index=False)
    config = pin_models(
        load_config(
            None,
            {
                "name": "cv",
                "runs_dir": str(work / "runs"),
                "prepare": {
                    "input": str(work / "ads.csv"),
                    "label_col": "isco_submajor",
                    "id_col": "id",
                    "labels": {
                        "path": str(CARRY / "labels.csv"),
                        "code_col": "code",
                        "name_col": "name_en",
                        "description_col": "description_en",
                        "filter": {"level": "isco_submajor"},
                    },
                    "min_class_count": 3,
                    "rare_policy": "merge",
                    "max_rows": args.rows,
                },
                "clean": {"backend": "rules", "language": "pl"},
                "embed": {
                    "model": str(work / "encoder"),
                    "max_seq_length": args.max_len,
                    "device": args.device,
                    "precision": args.precision,
                    "batch_size": 128,
                    "cache_dir": str(work / "cache"),
                },
                # no judge: a random-init encoder's neighbours are noise, and the model judge would drop them all
                # (its cost per fold, LR fits on CPU, is in docs/results.md's real-data run)
                "triplets": {"judge": "none", "max_anchors_per_class": 10_000, "relative_margin": 1.0},
                "finetune": {
                    "enabled": True,
                    "max_triplets": args.triplets,
                    "max_seq_length": args.max_len,
                    "batch_size": args.batch,
                    "device": args.device,
                    "precision": args.precision,
                    "evals_per_epoch": 1,
                },
                "report": {
                    "systems": ["centroid", "tfidf"],
                    "cv_folds": args.folds,
                    "finetune_cv": True,
                    "keep_fold_models": True,
                },
            },
        )
    )
    t1 = time.perf_counter()
    run_stages(config, target="embed", progress=False)
    before_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    run_stages(config, target="finetune-cv", progress=False)
    stage_s = time.perf_counter() - t2
    units = config.run_dir / "finetune-cv" / "units"
    folds = [json.loads((units / f"fold-{k}" / "fold.json").read_text()) for k in range(1, args.folds + 1)]
    ft_s = [f["finetune"]["seconds"] for f in folds]
    enc_s = [f["encode_seconds"] for f in folds]
    rest_s = (stage_s - sum(ft_s) - sum(enc_s)) / args.folds  # mining, judging, loading and saving per fold
    n_dev = sum(f["rows"]["triplet_train"] + f["rows"]["inner_slice"] + f["rows"]["held_out"] for f in folds[:1])

    # the plain way to re-encode the dev pool with a fold's model, same texts and batch size
    from sentence_transformers import SentenceTransformer

    from jobembed.evaluate import dev_pool
    from jobembed.stages import prepared

    splits, _ = prepared(config)
    texts = dev_pool(splits)[str(config.text_column)].tolist()
    folder = units / "fold-1" / "finetune" / "model"
    prompt = json.loads((folder / "jobembed-prompts.json").read_text()).get("text_prompt") or ""
    t3 = time.perf_counter()  # load and encode, as jobembed's encode_seconds counts them
    plain = SentenceTransformer(str(folder), device=args.device)
    plain.max_seq_length = args.max_len
    plain.encode([prompt + t for t in texts], batch_size=128)
    plain_s = time.perf_counter() - t3
    # training steps scale with triplets; evaluations, loading and saving the model do not
    steps_s = []
    for k in range(1, args.folds + 1):
        log = [json.loads(line) for line in (units / f"fold-{k}" / "finetune" / "log.jsonl").read_text().splitlines()]
        train = next(r["train_runtime"] for r in reversed(log) if "train_runtime" in r)
        steps_s.append(train - sum(r.get("eval_runtime", 0.0) for r in log))
    per_triplet = sum(steps_s) / sum(f["finetune"]["triplets"] for f in folds)
    fixed_s = (sum(ft_s) - sum(steps_s)) / args.folds
    per_ad = sum(enc_s) / (args.folds * n_dev)
    est = 5 * (rest_s + fixed_s + 10_000 * per_triplet + n_dev * per_ad)
    rows = {
        "date": str(date.today()),
        "shape": args.shape,
        "device": args.device,
        "precision": args.precision,
        "max_len": args.max_len,
        "dev_ads": n_dev,
        "folds": args.folds,
        "triplets_per_fold": [f["finetune"]["triplets"] for f in folds],
        "build_s": round(build_s, 1),
        "prepare_clean_embed_s": round(before_s, 1),
        "stage_s": round(stage_s, 1),
        "finetune_s": ft_s,
        "training_steps_s": [round(s, 1) for s in steps_s],
        "encode_s": enc_s,
        "mine_judge_io_s_per_fold": round(rest_s, 1),
        "plain_encode_s": round(plain_s, 2),
        "encode_ratio_plain_over_jobembed": round(plain_s / max(enc_s[0], 1e-9), 2),
        "five_folds_10k_triplets_s": round(est, 0),
    }
    print("| what | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    print(
        f"\n5 folds at 10,000 triplets each, {args.max_len} tokens, {n_dev} dev ads on this device: ~{est / 60:.1f} "
        "minutes (fine-tuning scaled by triplets, encoding by ads, mining and judging as measured)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
