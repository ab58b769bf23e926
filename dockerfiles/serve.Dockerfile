# jobembed's server without PyTorch: a bundle made with `jobembed bundle RUN --backend onnx-int8` carries its encoder as
# int8 ONNX + tokenizer; here it runs on ONNX Runtime with NumPy heads (rules cleaning; a GLiNER2 cleaner needs torch).
#
#   docker build -f dockerfiles/serve.Dockerfile -t jobembed-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo/bundle:/bundle:ro" jobembed-serve
#   curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' -d '{"texts": ["Kierowca kat. C+E"]}'
#
# BASE: any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module; python:3.11-slim by default.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    JOBEMBED_CACHE=/tmp/jobembed-cache

# The serving runtime only (no torch, transformers or sentence-transformers): the heads run in NumPy, the encoder on
# ONNX Runtime, the tokenizer with `tokenizers`.
RUN python3 -m venv /opt/venv \
    && pip install \
        "numpy>=1.26" "pandas>=2.2" "scipy>=1.11" "scikit-learn>=1.5" "safetensors>=0.4" \
        "pydantic>=2.6" "PyYAML>=6" "typer>=0.12" "rich>=13" "fastapi>=0.110" "uvicorn[standard]>=0.30" \
        "prometheus-client>=0.20" "onnxruntime>=1.17" "tokenizers>=0.19"

COPY pyproject.toml README.md /src/
COPY jobembed /src/jobembed
RUN pip install --no-deps /src && rm -rf /src \
    && useradd --create-home --uid 10001 jobembed

USER 10001
WORKDIR /home/jobembed
EXPOSE 8000
# The bundle is mounted read-only at /bundle; nothing is written there (vectors are cached in memory).
VOLUME ["/bundle"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["jobembed-serve"]
CMD ["--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000", "--backend", "onnx-int8"]
