#!/usr/bin/env bash
# The fine-tuning recipe inside the CV (finetune-cv) on a lent GPU machine (H100/H200), in one call of under 5 minutes:
# a random-init e5-small-shaped encoder (no weights reach that machine) with the e5 tokenizer, 3,000 pl-jobads ads,
# 3 folds of 2,000 triplets at 256 tokens, bf16. Prints per fold mining, fine-tuning and re-encoding time, the plain
# SentenceTransformer encode of the dev pool against jobembed's, and what 5 folds at 10,000 triplets would take.
#
# Here, once (the GPU image has torch, transformers, sentence-transformers, accelerate, pandas, pyarrow, pyyaml,
# scikit-learn, rich, typer, xxhash, fsspec, httpx, psutil; jobembed's pipeline also imports what the list below
# holds):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 cleanlab==2.9.0 termcolor==3.3.0 matplotlib==3.11.2 \
#     cycler==0.12.1 kiwisolver==1.5.1 fonttools==4.68.0 pyparsing==3.3.3 narwhals==2.29.0
#   .venv/bin/python experiments/bench_finetune_cv.py --prepare-carry   # .bench/: tokenizer, texts, cv/ ads (~24 MB)
# Then the device tool: run(command="bash experiments/gpu_finetune_cv.sh", carry=[".whl", ".bench"], timeout_s=420)
# and copy the Markdown table it prints into docs/benchmarks.md#fine-tuning-inside-the-cv.
#
# Budget: the random model ~20 s; prepare, clean and embed of 3,000 ads ~20 s; per fold the frozen-vector mining
# (seconds), 2,000 triplets at batch 64 (~32 steps) with one evaluation, and the re-encode of ~2,100 dev ads: well
# under a minute each on an H100. A missing package stops it at once (the import check), not after the model build.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export JOBEMBED_CACHE=/tmp/jobembed-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jobembed.stages, sentence_transformers, datasets, cleanlab, matplotlib"
python3 experiments/bench_finetune_cv.py --shape e5-small --device cuda --precision bf16 --rows 3000 --folds 3 \
  --triplets 2000 --max-len 256 --batch 64 --json "${OUT:-/tmp}/bench_finetune_cv.json"
