"""Property-based fuzzing of the upload endpoints (hypothesis): whatever arrives, the answer is a 2xx that
matches the ``Prediction`` schema or a 4xx that matches ``ErrorResponse`` — never a 5xx, never a hang.

Examples are bounded so the whole file runs in seconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from _serving import serve_settings
from leaflens.serving import schemas
from leaflens.serving.api import create_app

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLIENT_ERRORS = {400, 405, 413, 415, 422}


@pytest.fixture(scope="module")
def client(model_package: Path):
    settings_ = serve_settings(
        max_upload_bytes=200_000, max_pixels=2_000_000, max_batch_files=4, max_wait_ms=1
    )
    with TestClient(create_app(model_package, settings_)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def leaf_jpeg() -> bytes:
    path = sorted(sorted(p for p in SAMPLE.iterdir() if p.is_dir())[0].iterdir())[0]
    return path.read_bytes()


def check(response) -> None:
    """The contract: 200 with a valid Prediction/BatchResponse, or a 4xx with a valid ErrorResponse."""
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        model = schemas.BatchResponse if "results" in body else schemas.Prediction
        model.model_validate(body)
    else:
        assert response.status_code in CLIENT_ERRORS, response.text
        schemas.ErrorResponse.model_validate(body)


content_types = st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain", ""])
filenames = st.text(min_size=0, max_size=40).filter(lambda s: "\x00" not in s)


@FUZZ
@given(data=st.binary(max_size=4096), name=filenames, content_type=content_types)
def test_random_bytes(client, data, name, content_type):
    check(client.post("/v1/predict", files={"file": (name or "x", data, content_type or None)}))


@FUZZ
@given(
    cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8)
)
def test_mutated_real_photo(client, leaf_jpeg, cut, flips):
    data = bytearray(leaf_jpeg[: max(1, int(len(leaf_jpeg) * cut))])
    for where, value in flips:
        data[min(len(data) - 1, int(where * len(data)))] = value
    check(client.post("/v1/predict", files={"file": ("leaf.jpg", bytes(data), "image/jpeg")}))


@FUZZ
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "1", "LA", "I;16"]),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]),
    seed=st.integers(0, 2**16),
)
def test_synthetic_images_of_any_size_mode_and_format(client, width, height, mode, fmt, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)  # mode I;16
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot store this mode: nothing to send
        return
    data = buffer.getvalue()
    response = client.post("/v1/predict", files={"file": (f"x.{fmt.lower()}", data, "image/png")})
    check(response)
    if len(data) > 200_000:
        assert response.json()["error"]["code"] in ("file_too_large", "too_large_request")
    elif min(width, height) < 32:
        assert response.json()["error"]["code"] == "too_small"
    else:
        assert response.status_code == 200, response.text


@FUZZ
@given(
    field=st.text(min_size=1, max_size=12).filter(lambda s: s.isprintable() and s not in ("file", "files")),
    explain=st.text(max_size=10),
)
def test_wrong_fields_and_query_values(client, leaf_jpeg, field, explain):
    check(
        client.post(
            "/v1/predict", params={"explain": explain}, files={field: ("a.jpg", leaf_jpeg, "image/jpeg")}
        )
    )


@FUZZ
@given(
    parts=st.lists(
        st.tuples(st.sampled_from(["files", "file", "other"]), st.binary(max_size=512)), max_size=6
    )
)
def test_batch_of_anything(client, leaf_jpeg, parts):
    files = [(field, (f"{i}.jpg", data or leaf_jpeg, "image/jpeg")) for i, (field, data) in enumerate(parts)]
    check(client.post("/v1/predict/batch", files=files))
