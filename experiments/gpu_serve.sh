#!/usr/bin/env bash
# The serving benchmark on a lent GPU machine (H100/H200), in one call of under 5 minutes: a random-init XLM-R base
# encoder (no weights reach that machine; paraphrase-multilingual-mpnet-base-v2 has this shape) with the e5
# tokenizer, fp16, a real `jobembed serve` process on loopback, torch backend, micro-batching off (one encode call
# per request: the plain way) and on, at concurrency 1, 8, 32 and 64. Target: batching >= 3x at high concurrency.
#
# Here, once (the GPU image has torch, sentence-transformers, httpx, prometheus-client, psutil, typer, rich,
# scikit-learn, pandas, pyarrow, uvloop; it lacks fastapi, starlette, uvicorn, pydantic and datasets):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
#   .venv/bin/python experiments/bench_finetune.py --prepare-carry    # .bench/: e5 tokenizer + real ad texts, ~17 MB
# Then the device tool: run(command="bash experiments/gpu_serve.sh", carry=[".whl", ".bench"], timeout_s=420)
# and copy the Markdown table it prints into docs/benchmarks.md#serve.
#
# Budget: building the random model and the bundle ~30 s; per setting a server start (~20 s) and 4 levels of
# at least 256 single-ad requests (seconds each on an H100): about 3 minutes.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export JOBEMBED_CACHE=/tmp/jobembed-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 experiments/bench_serve.py --random-init xlmr-base --tokenizer .bench/tokenizer --texts .bench/triplets.parquet \
  --device cuda --backends torch --concurrency 1,8,32,64 --requests 256 --memory-requests 0
