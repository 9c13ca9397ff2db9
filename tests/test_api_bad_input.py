"""A corpus of bad and unusual uploads, generated here: each gets a JSON answer saying what was wrong, never
a 5xx.

Unusual but valid images (CMYK, 16-bit, palette, RGBA, grayscale, EXIF-rotated, mislabelled content type)
must be diagnosed like the same picture in plain RGB.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from _serving import serve_settings
from leaflens.images import decode_image
from leaflens.serving.api import create_app

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
LIMIT = 300_000  # max_upload_bytes of the app under test


@pytest.fixture(scope="module")
def leaf() -> Image.Image:
    path = sorted(sorted(p for p in SAMPLE.iterdir() if p.is_dir())[0].iterdir())[0]
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def client(model_package: Path):
    settings = serve_settings(
        max_upload_bytes=LIMIT, max_pixels=4_000_000, max_batch_files=3, min_image_side=32
    )
    with TestClient(create_app(model_package, settings)) as test_client:
        yield test_client


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def post(client: TestClient, data: bytes, name: str = "leaf.jpg", content_type: str = "image/jpeg"):
    return client.post("/v1/predict", files={"file": (name, data, content_type)})


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (the header of a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# -- refused, with the reason --------------------------------------------------------------------------------
def test_zero_bytes(client):
    assert_error(post(client, b""), 400, "empty")


def test_text_file_sent_as_jpeg(client):
    error = assert_error(post(client, b"hello, I am not a photo\n" * 10, "leaf.jpg"), 415, "not_an_image")
    assert error["filename"] == "leaf.jpg"


def test_html_and_random_bytes(client):
    assert_error(post(client, b"<html><body>hi</body></html>", "x.png", "image/png"), 415, "not_an_image")
    random = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert_error(post(client, random), 415, "not_an_image")


def test_truncated_jpeg(client, leaf):
    data = encode(leaf, "JPEG", quality=95)
    assert_error(post(client, data[: len(data) // 2]), 422, "corrupt")


def test_jpeg_with_garbage_after_the_header(client, leaf):
    data = encode(leaf, "JPEG")
    broken = data[:200] + bytes(len(data) - 200)
    response = post(client, broken)
    assert response.status_code in (415, 422), response.text
    assert response.json()["error"]["code"] in ("corrupt", "not_an_image")


def test_truncated_png(client, leaf):
    data = encode(leaf, "PNG")
    assert_error(post(client, data[: len(data) // 3], "leaf.png", "image/png"), 422, "corrupt")


def test_decompression_bomb_header_is_refused_before_decoding(client):
    assert_error(post(client, png_claiming_size(60_000, 60_000), "bomb.png", "image/png"), 413, "too_large")


def test_real_image_over_the_pixel_limit(client):
    big = Image.new("L", (2500, 2000), 128)  # 5 Mpx > 4 Mpx limit, but compresses to a few KB
    data = encode(big, "PNG")
    assert len(data) < LIMIT
    assert_error(post(client, data, "big.png", "image/png"), 413, "too_large")


def test_tiny_image(client, leaf):
    assert_error(post(client, encode(leaf.resize((8, 8)), "PNG"), "tiny.png"), 422, "too_small")


def test_file_over_the_upload_limit(client):
    noise = np.random.default_rng(1).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    assert LIMIT < len(data) < LIMIT + 32_000  # over the file limit, under the body limit
    error = assert_error(post(client, data, "noise.png", "image/png"), 413, "file_too_large")
    assert str(LIMIT) in error["message"]


def test_body_over_the_limit_is_refused_before_it_is_read(client):
    response = client.post("/v1/predict", files={"file": ("huge.jpg", b"\xff" * (LIMIT * 2), "image/jpeg")})
    assert_error(response, 413, "too_large_request")


def test_wrong_field_name(client, leaf):
    response = client.post("/v1/predict", files={"image": ("leaf.jpg", encode(leaf, "JPEG"), "image/jpeg")})
    error = assert_error(response, 422, "missing_file")
    assert "'file'" in error["message"] and "image" in error["message"]


def test_text_field_instead_of_a_file(client):
    assert_error(client.post("/v1/predict", data={"file": "leaf.jpg"}), 422, "invalid_request")


def test_json_body_instead_of_multipart(client):
    response = client.post("/v1/predict", json={"image": "aGVsbG8="})
    error = assert_error(response, 422, "missing_file")
    assert "multipart/form-data" in error["message"]


def test_malformed_multipart(client):
    response = client.post(
        "/v1/predict", content=b"--xyz\r\nnot a part", headers={"content-type": "multipart/form-data"}
    )
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["message"]


def test_too_many_files_in_a_batch(client, leaf):
    data = encode(leaf, "JPEG")
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i in range(4)]
    error = assert_error(client.post("/v1/predict/batch", files=files), 413, "too_many_files")
    assert "at most 3" in error["message"]


def test_empty_batch_and_wrong_batch_field(client, leaf):
    assert_error(client.post("/v1/predict/batch"), 422, "missing_file")
    response = client.post("/v1/predict/batch", files={"file": ("a.jpg", encode(leaf, "JPEG"), "image/jpeg")})
    assert "'files'" in assert_error(response, 422, "missing_file")["message"]


def test_batch_reports_each_bad_file_and_keeps_the_good_ones(client, leaf):
    files = [
        ("files", ("good.jpg", encode(leaf, "JPEG"), "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("cut.jpg", encode(leaf, "JPEG")[:500], "image/jpeg")),
    ]
    body = client.post("/v1/predict/batch", files=files).json()
    assert [r["error"]["code"] if r["error"] else "ok" for r in body["results"]] == ["ok", "empty", "corrupt"]
    assert (body["succeeded"], body["failed"]) == (1, 2)


def test_bad_query_parameter(client, leaf):
    response = client.post(
        "/v1/predict?explain=perhaps", files={"file": ("a.jpg", encode(leaf, "JPEG"), "image/jpeg")}
    )
    assert "explain" in assert_error(response, 422, "invalid_request")["message"]


def test_unknown_route_and_wrong_method(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


# -- unusual but valid: the same diagnosis as the plain RGB picture ------------------------------------------
def top1(client: TestClient, data: bytes, name: str, content_type: str = "image/png") -> dict:
    response = post(client, data, name, content_type)
    assert response.status_code == 200, response.text
    return response.json()


def engine_top1(client: TestClient, data: bytes) -> str:
    engine = client.app.state.service.engine
    return engine.predict_arrays([decode_image(data)])[0].best.name


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("RGB", "WEBP")],
)
def test_image_modes_are_converted(client, leaf, mode, fmt):
    if mode == "I;16":
        grey = np.asarray(leaf.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        image = Image.fromarray(grey)  # uint16 -> mode I;16
    elif mode == "P":
        image = leaf.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    else:
        image = leaf.convert(mode)
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith(mode[0])
    body = top1(client, data, f"leaf.{fmt.lower()}", f"image/{fmt.lower()}")
    assert body["top_k"][0]["name"] == engine_top1(client, data)
    assert (body["width"], body["height"]) == leaf.size


def test_transparent_rgba_is_composited_over_white(client, leaf):
    rgba = leaf.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the picture is a white page
    white = Image.new("RGB", leaf.size, (255, 255, 255))
    body = top1(client, encode(rgba, "PNG"), "clear.png")
    assert body["top_k"][0]["name"] == engine_top1(client, encode(white, "PNG"))


def test_exif_rotated_photo_is_turned_upright(client, leaf):
    wide = leaf.resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated = encode(wide, "JPEG", exif=exif.tobytes(), quality=95)
    body = top1(client, rotated, "phone.jpg", "image/jpeg")
    assert (body["width"], body["height"]) == (200, 300)
    # Turned the right way, not the opposite one (which test-time flips could not tell apart by the answer):
    # the decoded pixels match the upright photo up to JPEG noise.
    decoded = decode_image(rotated).astype(np.int16)
    upright = np.asarray(wide.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    upside_down = np.asarray(wide.transpose(Image.Transpose.ROTATE_90), dtype=np.int16)
    assert np.abs(decoded - upright).mean() < np.abs(decoded - upside_down).mean() / 4
    assert body["top_k"][0]["name"] == engine_top1(client, rotated)


def test_content_type_is_not_trusted(client, leaf):
    jpeg = encode(leaf, "JPEG")
    for claimed in ("image/png", "application/octet-stream", "text/plain"):
        assert top1(client, jpeg, "leaf.bin", claimed)["top_k"]
