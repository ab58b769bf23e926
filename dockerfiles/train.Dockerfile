# The whole jobembed pipeline on a GPU: `jobembed run`, `jobembed finetune`, `jobembed report --finetune-cv`, ...
#
#   docker build -f dockerfiles/train.Dockerfile -t jobembed-train .
#   docker run --rm --gpus all -v "$PWD/runs:/runs" -v "$HOME/.cache/jobembed:/cache" -v "$PWD/data:/data:ro" \
#       jobembed-train run --config /runs/pl.yaml
#
# BASE: a CUDA runtime image (default) or any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module.
# TORCH: the pip requirement for PyTorch; the default takes PyPI's CUDA build. For a CPU image pass a CPU wheel:
#   --build-arg TORCH=/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (put it in dockerfiles/wheels/)
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG TORCH="torch>=2.4"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    JOBEMBED_CACHE=/cache \
    HF_HOME=/cache/huggingface

# CUDA runtime images come without Python; Debian-like bases that have it skip this.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Wheels found here (a CPU torch for a CPU image) are installed instead of a download; the folder may hold nothing.
COPY dockerfiles/wheels/ /wheels/
# the torch requirement is the TORCH build argument (a pin, a range or a wheel file)
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --find-links /wheels "${TORCH}"

COPY pyproject.toml README.md /src/
COPY jobembed /src/jobembed
RUN pip install --find-links /wheels "/src[tracking]" && rm -rf /src /wheels \
    && useradd --create-home --uid 10001 jobembed \
    && mkdir -p /runs /cache && chown jobembed /runs /cache

USER 10001
WORKDIR /runs
# run folders and the model/vector cache outlive the container
VOLUME ["/runs", "/cache"]
ENTRYPOINT ["jobembed"]
CMD ["--help"]
