#!/usr/bin/env bash
# The clean benchmark on a lent GPU machine (H100/H200), in one call of under 5 minutes.
#
# Here, once (the GPU image has torch, transformers, sentence-transformers, pandas, pyyaml, rich, typer; it lacks
# gliner2 and pydantic):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     gliner2==2.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   .venv/bin/python experiments/bench_clean.py kit            # experiments/out/clean_kit, ~22 MB
# Then the device tool: run(command="bash experiments/gpu_clean.sh", carry=[".whl", "experiments/out/clean_kit"])
# and copy the Markdown table it prints into docs/benchmarks.md.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 experiments/bench_clean.py run --shape mdeberta-v3-base --device cuda --n 2000 --baseline-n 200 \
  --batch-sizes 32,64 --train-steps 60 --json-out "${OUT:-/tmp}/bench_clean.json"
