"""``leaflens serve package=<dir>``: run the API with uvicorn (host, port, workers from ``cfg.serve``).

With several workers uvicorn starts each one from an import string, so the settings travel to the workers
in an environment variable and :func:`app_from_env` builds the app there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from leaflens.logs import logger
from leaflens.serving.api import ServeSettings, create_app

ENV_PACKAGE = "LEAFLENS_SERVE_PACKAGE"
ENV_SETTINGS = "LEAFLENS_SERVE_SETTINGS"


def settings_from_config(serve: DictConfig) -> ServeSettings:
    """Typed settings from the ``serve`` config group."""
    summaries = serve.get("summaries") or {}
    store = summaries.get("path") if summaries.get("enabled") else None
    return ServeSettings(
        max_upload_bytes=int(serve.max_upload_bytes),
        max_pixels=int(serve.max_pixels),
        max_batch_files=int(serve.max_batch_files),
        min_image_side=int(serve.min_image_side),
        max_batch_size=int(serve.max_batch_size),
        max_wait_ms=float(serve.max_wait_ms),
        num_threads=int(serve.num_threads),
        batch_concurrency=int(serve.batch_concurrency),
        top_k=int(serve.top_k),
        summaries_path=Path(str(store)) if store else None,
        store_raw_images=bool(summaries.get("store_raw_images", False)),
        drift=dict(OmegaConf.to_container(serve.drift, resolve=True)),  # type: ignore[arg-type]
    )


def _settings_to_env(settings: ServeSettings) -> str:
    values = asdict(settings)
    values["summaries_path"] = str(settings.summaries_path) if settings.summaries_path else None
    return json.dumps(values)


def app_from_env():
    """App factory for uvicorn workers: package and settings come from the environment :func:`serve` set."""
    package, settings = os.environ.get(ENV_PACKAGE), os.environ.get(ENV_SETTINGS)
    if not package or not settings:
        raise RuntimeError(
            f"{ENV_PACKAGE} and {ENV_SETTINGS} must be set: start the service with "
            "`leaflens serve package=<dir>`"
        )
    values = json.loads(settings)
    if values.get("summaries_path"):
        values["summaries_path"] = Path(values["summaries_path"])
    return create_app(package, ServeSettings(**values))


def serve(cfg: DictConfig) -> None:
    """Check the package, then serve it until interrupted.

    Raises:
        SystemExit: with a message saying how to fix it, when ``package`` is unset or not a valid package.
    """
    import uvicorn

    from leaflens.serving.package import PackageError, verify_package

    if not cfg.get("package"):
        raise SystemExit("leaflens serve: no model package given; run `leaflens serve package=<dir>`")
    package = Path(str(cfg.package)).expanduser().resolve()
    try:
        # Fail here with one clear line rather than in every worker's lifespan with a traceback.
        verify_package(package)
    except PackageError as err:
        raise SystemExit(f"leaflens serve: {err}") from err

    settings = settings_from_config(cfg.serve)
    workers = max(1, int(cfg.serve.workers))
    os.environ[ENV_PACKAGE] = str(package)
    os.environ[ENV_SETTINGS] = _settings_to_env(settings)
    logger.info(
        "Serving {} on http://{}:{} with {} worker(s)", package, cfg.serve.host, cfg.serve.port, workers
    )
    uvicorn.run(
        "leaflens.serving.server:app_from_env",
        factory=True,
        host=str(cfg.serve.host),
        port=int(cfg.serve.port),
        workers=workers,
        log_level=str(cfg.serve.get("log_level", "info")),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for test and benchmark servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def background_server(
    package_dir: str | Path,
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    startup_timeout: float = 120.0,
) -> Iterator[str]:
    """Run the service with uvicorn in a subprocess until the block ends; yields its URL once it is ready.

    Used by the browser test and the load test, which need a real server on a real socket.

    Raises:
        RuntimeError: with the server's log, if it exits or is not ready within ``startup_timeout`` seconds.
    """
    port = port or free_port(host)
    env = {
        **os.environ,
        ENV_PACKAGE: str(Path(package_dir).resolve()),
        ENV_SETTINGS: _settings_to_env(settings),
    }
    command = [
        sys.executable, "-m", "uvicorn", "leaflens.serving.server:app_from_env", "--factory",
        "--host", host, "--port", str(port), "--workers", str(workers), "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://{host}:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, process, log, startup_timeout)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening or not ready yet
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s:\n{log.read()[-4000:]}")


__all__ = ["app_from_env", "background_server", "create_app", "free_port", "serve", "settings_from_config"]
