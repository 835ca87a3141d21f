# syntax=docker/dockerfile:1
#
# CNN applications service on CUDA.
#
#   docker build -t cnn-apps .
#   docker run --gpus all -p 8000:8000 -v cnn-data:/data cnn-apps
#
# The CUDA 13 runtime and cuDNN come from the hash-pinned wheels in requirements.lock
# (nvidia-cuda-runtime, nvidia-cudnn-cu13, ...), so the base image only has to provide the
# NVIDIA container-runtime setup; the host needs an NVIDIA driver that supports CUDA 13 (>= 580).
# The same image runs on CPU when no GPU is given to it (CNN_DEVICE=auto).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04's own python3.11 is a release candidate).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgomp1 \
    && apt-get purge -y --auto-remove software-properties-common gnupg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependency layer first, so code changes do not reinstall torch: exactly the README install step.
COPY requirements.lock ./
RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The project itself (editable: PROJECT_ROOT stays /app, so ./weights resolves to /app/weights).
COPY pyproject.toml README.md ./
COPY app/ app/
COPY models/ models/
COPY weights/ weights/
RUN pip install --no-deps --no-build-isolation --no-index -e . \
    && python -c "import app.main"

# Non-root user; /data holds the torch hub cache and the stores (a volume, owned by the user).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /data/torch /data/stores \
    && chown -R app:app /data
USER app

ENV CNN_HOST=0.0.0.0 \
    CNN_PORT=8000 \
    CNN_WEIGHTS_DIR=/app/weights \
    TORCH_HOME=/data/torch \
    MPLCONFIGDIR=/tmp/matplotlib

VOLUME ["/data"]
EXPOSE 8000

# Ready = models loaded and the default classifier serving (503 before: urlopen raises, exit 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${CNN_PORT:-8000}/health/ready', timeout=4)" || exit 1

CMD ["python", "-m", "app.cli", "serve"]
