"""The inference engine: same answer through the CLI and the Python API, any image mode, concurrent
callers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SAMPLE_DIR
from leaflens.images import decode_image
from leaflens.serving.engine import InferenceEngine


@pytest.fixture(scope="module")
def engine(model_package: Path) -> InferenceEngine:
    return InferenceEngine.from_package(model_package, top_k=3)


@pytest.fixture(scope="module")
def leaf_paths() -> list[Path]:
    paths = sorted(p for p in SAMPLE_DIR.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return paths[:: len(paths) // 6][:6]


def _png(image: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_cli_and_python_api_give_identical_output(
    engine: InferenceEngine, model_package: Path, leaf_paths: list[Path]
) -> None:
    from leaflens.cli import app
    from leaflens.logs import setup_logging

    path = leaf_paths[0]
    try:
        result = CliRunner().invoke(app, ["predict", str(path), f"package={model_package}", "--json"])
    finally:
        setup_logging()  # the CLI pointed the log sink at the runner's (now closed) stderr
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    api = engine.predict_paths([path])[0]
    assert len(cli) == 1 and cli[0]["ok"] and cli[0]["file"] == str(path)
    assert {k: v for k, v in cli[0].items() if k not in ("file", "ok")} == api.prediction.to_dict()
    # And through the decoded-array and bytes entry points.
    assert engine.predict_arrays([decode_image(path)])[0].to_dict() == api.prediction.to_dict()
    assert engine.predict_bytes([path.read_bytes()])[0].prediction.to_dict() == api.prediction.to_dict()


def test_prediction_records_are_complete_and_calibrated(
    engine: InferenceEngine, leaf_paths: list[Path]
) -> None:
    predictions = engine.predict_arrays([decode_image(p) for p in leaf_paths])
    for p in predictions:
        probs = [s.probability for s in p.top_k]
        assert len(p.top_k) == 3 and probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
        assert p.confidence == probs[0] and p.abstain == (p.confidence < engine.threshold)
        best = engine.labels[p.best.class_id]
        assert (p.best.name, p.best.crop, p.best.disease, p.best.healthy) == (
            best["name"], best["crop"], best["disease"], best["healthy"])  # fmt: skip
        assert p.embedding.ndim == 1 and np.isfinite(p.embedding).all()
    logits, _ = engine.infer(np.zeros((2, *engine.input_size), dtype=np.float32))
    np.testing.assert_allclose(engine.calibrated_probs(logits).sum(axis=1), 1.0, atol=1e-9)


def test_exif_rotated_grayscale_and_rgba_inputs(engine: InferenceEngine, leaf_paths: list[Path]) -> None:
    rgb = decode_image(leaf_paths[1])
    # Stored rotated with EXIF orientation 6 ("rotate 90° clockwise to display"): decoding must undo it
    # exactly.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _png(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90), exif=exif)
    rgba = _png(Image.fromarray(rgb).convert("RGBA"))
    gray = Image.fromarray(rgb).convert("L")
    results = engine.predict_bytes([rotated, rgba, _png(gray)], names=["rotated", "rgba", "gray"])
    reference = engine.predict_arrays([rgb])[0].to_dict()
    assert [r.source for r in results] == ["rotated", "rgba", "gray"] and all(r.ok for r in results)
    assert results[0].prediction.to_dict() == reference
    assert results[1].prediction.to_dict() == reference
    gray_rgb = np.repeat(np.asarray(gray)[..., None], 3, axis=2)
    assert results[2].prediction.to_dict() == engine.predict_arrays([gray_rgb])[0].to_dict()


def test_bad_bytes_are_reported_per_item(engine: InferenceEngine, leaf_paths: list[Path]) -> None:
    good = leaf_paths[2].read_bytes()
    results = engine.predict_bytes([b"", b"%PDF-1.4 not an image", good[: len(good) // 3], good])
    assert [r.reason for r in results[:3]] == ["empty", "not_an_image", "corrupt"]
    assert all(r.prediction is None and r.error for r in results[:3])
    assert results[3].ok


def test_concurrent_callers_get_the_sequential_answers(
    engine: InferenceEngine, leaf_paths: list[Path]
) -> None:
    images = [decode_image(p) for p in leaf_paths] * 2
    sequential = [engine.predict_arrays([im])[0].to_dict() for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda im: engine.predict_arrays([im])[0].to_dict(), images))
    assert concurrent == sequential


def test_serving_path_imports_no_training_stack() -> None:
    code = (
        "import sys, leaflens.serving.engine, leaflens.serving.package, leaflens.predict; "
        "bad = [m for m in ('torch', 'timm', 'lightning', 'torchvision') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
