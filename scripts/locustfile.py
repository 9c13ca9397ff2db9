"""Locust scenario for the leaflens service (run by scripts/load_test.py, or by hand):

    locust -f scripts/locustfile.py --headless -u 32 -r 32 -t 30s --host http://127.0.0.1:8000 SingleImageUser

Users post real leaf photos from ``LEAFLENS_LOAD_IMAGES`` (default: the bundled sample) with no think time:
``SingleImageUser`` one photo per ``POST /v1/predict``, ``BatchUser`` ``LEAFLENS_LOAD_BATCH`` photos per
``POST /v1/predict/batch``. Multipart bodies are encoded once up front so the load generator, which shares the
CPU with the server here, spends as little as possible per request.

Importing locust monkey-patches the process with gevent: never import this file from the app or the tests.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

from locust import FastHttpUser, constant, task

IMAGE_DIR = Path(
    os.environ.get("LEAFLENS_LOAD_IMAGES", Path(__file__).resolve().parents[1] / "data" / "sample")
)
BATCH = int(os.environ.get("LEAFLENS_LOAD_BATCH", "16"))
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _multipart(field: str, files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


PHOTOS = sorted(p for p in IMAGE_DIR.rglob("*") if p.suffix.lower() in SUFFIXES)
if not PHOTOS:
    raise SystemExit(f"no images under {IMAGE_DIR} (set LEAFLENS_LOAD_IMAGES)")
SINGLE_BODIES = [_multipart("file", [p]) for p in PHOTOS]
BATCH_BODIES = [_multipart("files", PHOTOS[i : i + BATCH]) for i in range(0, len(PHOTOS) - BATCH + 1, BATCH)]


class SingleImageUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        body, content_type = random.choice(SINGLE_BODIES)
        with self.client.post(
            "/v1/predict", data=body, headers={"Content-Type": content_type}, catch_response=True
        ) as response:
            if response.status_code != 200 or not response.json().get("top_k"):
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")


class BatchUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict_batch(self) -> None:
        body, content_type = random.choice(BATCH_BODIES)
        with self.client.post(
            "/v1/predict/batch", data=body, headers={"Content-Type": content_type}, catch_response=True
        ) as response:
            if response.status_code != 200 or response.json().get("failed", 1) != 0:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
