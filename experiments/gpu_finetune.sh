#!/usr/bin/env bash
# The fine-tuning speed benchmark on a lent GPU machine (H100/H200), in one call of under 5 minutes.
#
# Here, once (the GPU image has torch, transformers, sentence-transformers, accelerate, pandas, pyarrow, pyyaml,
# xxhash, fsspec; it lacks datasets and pydantic):
#   echo /.whl/ >> .git/info/exclude; echo /.bench/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
#   .venv/bin/python experiments/bench_finetune.py --prepare-carry    # .bench/: e5 tokenizer + triplet texts, ~20 MB
# Then the device tool: run(command="bash experiments/gpu_finetune.sh", carry=[".whl", ".bench"], timeout_s=420)
# and copy the Markdown table it prints into docs/benchmarks.md#fine-tuning.
#
# Budget: XLM-R base at 256 tokens, bf16, batch 64 and 128, six settings each in its own process (a random-init
# model built per process, ~20 s; 30 timed steps; compile adds ~1 min): about 4 minutes on an H100.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 experiments/bench_finetune.py --shape xlmr-base --batch 64 128 --max-len 256 --precision bf16 \
  --tokenizer .bench/tokenizer --texts .bench/triplets.parquet --steps 30 --warmup 5 \
  --json "${OUT:-/tmp}/bench_finetune.json"
