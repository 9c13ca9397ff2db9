# Training image: data -> train -> evaluate -> export on CPU, with the config tree and the bundled sample.
#
#   docker build -f dockerfiles/train.Dockerfile -t leaflens-train .
#   docker run -v "$PWD/models:/app/models" -v "$PWD/reports:/app/reports" leaflens-train
#   docker run ... leaflens-train leaflens train experiment=quickstart trainer.max_epochs=3
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROJECT_ROOT=/app \
    WANDB_MODE=offline \
    MALLOC_MMAP_THRESHOLD_=4294967296 \
    MALLOC_TRIM_THRESHOLD_=68719476736 \
    MALLOC_TOP_PAD_=1073741824

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin leaflens
WORKDIR /app

# CPU-only torch from PyTorch's CPU index (the PyPI wheel pulls in CUDA), at the version requirements.lock pins;
# then the [train] extra with the same constraint file CI and `make setup` use (torch==2.14.1 is satisfied by
# 2.14.1+cpu, so pip keeps it).
COPY requirements.lock pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN TORCH="$(grep -E '^torch==' requirements.lock)" \
    && VISION="$(grep -E '^torchvision==' requirements.lock)" \
    && pip install --index-url https://download.pytorch.org/whl/cpu "${TORCH}" "${VISION}"
COPY src ./src
RUN pip install -c requirements.lock ".[train]"

# Configs are data: the image carries the one Hydra tree, the bundled sample and the shipped weights.
COPY configs ./configs
COPY data/sample ./data/sample
COPY models/pretrained ./models/pretrained
RUN mkdir -p /app/outputs /app/reports && chown -R leaflens:leaflens /app

USER 10001
CMD ["leaflens", "pipeline", "experiment=quickstart"]
