# The leaflens diagnosis service: FastAPI + ONNX Runtime, no torch (the serving path needs only the core
# dependencies of pyproject.toml, pinned by requirements.lock).
#
#   docker build -f dockerfiles/api.Dockerfile -t leaflens-api .
#   docker run -p 8000:8000 -v "$PWD/models/package:/models/package:ro" leaflens-api
#
# To bake the model package into the image instead of mounting it:
#   docker build -f dockerfiles/api.Dockerfile --target baked -t leaflens-api:baked .   (copies models/package)
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROJECT_ROOT=/app \
    LEAFLENS_CONFIG_DIR=/app/configs

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin leaflens
WORKDIR /app

# Dependencies first (cached while only the code changes): the same constraint file CI and `make setup` use,
# core dependencies only (no [train] extra: no torch, timm or Lightning).
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
RUN pip install -c requirements.lock . \
    && python -c "import leaflens.serving.api, sys; assert 'torch' not in sys.modules"

# The one config tree (serve.* settings); the drift summaries are written under /app/data.
COPY configs ./configs
RUN mkdir -p /app/data/serving /models/package && chown -R leaflens:leaflens /app/data

USER 10001
EXPOSE 8000
VOLUME ["/app/data/serving"]

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["leaflens", "serve"]
CMD ["package=/models/package", "serve.host=0.0.0.0", "serve.port=8000"]


# Variant with the package inside the image (build with --target baked).
FROM runtime AS baked
COPY --chown=leaflens:leaflens models/package /models/package


# Default target: the image without a package (mount one at /models/package).
FROM runtime
