"""The HTTP service end to end through ``TestClient`` on the package exported from the bundled sample."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from _serving import serve_settings
from leaflens.images import decode_image
from leaflens.serving.api import StartupError, create_app
from leaflens.serving.engine import InferenceEngine

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_images(n: int) -> list[Path]:
    """``n`` bundled sample photos from different classes."""
    folders = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    return [sorted(f.iterdir())[0] for f in folders[:n]]


@pytest.fixture(scope="module")
def engine(model_package: Path) -> InferenceEngine:
    return InferenceEngine.from_package(model_package)


@pytest.fixture
def client(model_package: Path, tmp_path: Path):
    app = create_app(
        model_package, serve_settings(summaries_path=tmp_path / "summaries.sqlite", max_wait_ms=2)
    )
    with TestClient(app) as test_client:
        yield test_client


def post_image(client: TestClient, path: Path, **params):
    return client.post(
        "/v1/predict", params=params, files={"file": (path.name, path.read_bytes(), "image/jpeg")}
    )


def metric(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app.state.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_serving_import_does_not_load_torch():
    code = (
        "import sys, leaflens.serving.api, leaflens.serving.server, leaflens.serving.batching; "
        "print(sorted(m for m in ('torch', 'lightning', 'timm', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_predict_matches_the_engine(client: TestClient, engine: InferenceEngine, model_package: Path):
    path = sample_images(1)[0]
    response = post_image(client, path)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = engine.predict_arrays([decode_image(path.read_bytes())])[0]
    assert [d["name"] for d in body["top_k"]] == [s.name for s in expected.top_k]
    np.testing.assert_allclose(
        [d["probability"] for d in body["top_k"]],
        [s.probability for s in expected.top_k],
        rtol=1e-5,
        atol=1e-6,
    )
    assert body["not_sure"] == expected.abstain
    assert len(body["top_k"]) == 3
    probabilities = [d["probability"] for d in body["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    model_json = json.loads((model_package / "model.json").read_text())
    assert body["model_version"] == str(model_json.get("version", "unknown"))
    assert body["filename"] == path.name
    assert (body["width"], body["height"]) == Image.open(path).size
    assert body["inference_ms"] > 0 and body["explanation"] is None


def test_batch_returns_one_result_per_file_in_order(client: TestClient, engine: InferenceEngine):
    paths = sample_images(4)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.insert(2, ("files", ("notes.txt", b"not an image", "text/plain")))
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["succeeded"], body["failed"]) == (4, 1)
    names = [r["filename"] for r in body["results"]]
    assert names == [paths[0].name, paths[1].name, "notes.txt", paths[2].name, paths[3].name]
    assert body["results"][2]["error"]["code"] == "not_an_image" and body["results"][2]["prediction"] is None
    good = [r for r in body["results"] if r["prediction"]]
    expected = engine.predict_arrays([decode_image(p.read_bytes()) for p in paths])
    assert [r["prediction"]["top_k"][0]["name"] for r in good] == [e.best.name for e in expected]


def test_model_info_describes_the_package(client: TestClient, model_package: Path):
    body = client.get("/v1/model").json()
    labels = json.loads((model_package / "labels.json").read_text())
    assert [label["name"] for label in body["labels"]] == [label["name"] for label in labels]
    assert body["num_classes"] == len(labels)
    assert (
        body["package_sha256"] == hashlib.sha256((model_package / "manifest.json").read_bytes()).hexdigest()
    )
    assert body["preprocessing"] == json.loads((model_package / "preprocess.json").read_text())
    assert body["calibration"]["temperature"] > 0
    assert set(body["files"]) >= {"model.onnx", "labels.json"}
    assert body["explain_available"] is True  # weights.safetensors exported, torch installed in the test env


def test_health_readiness_page_and_openapi(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text and 'capture="environment"' in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert {"Prediction", "Diagnosis", "ErrorResponse", "BatchResponse", "ModelInfo"} <= set(
        schema["components"]["schemas"]
    )


def test_not_ready_without_lifespan_and_healthz_still_alive(model_package: Path):
    client = TestClient(
        create_app(model_package, serve_settings())
    )  # no `with`: the lifespan has not run, nothing is loaded
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    refused = post_image(client, sample_images(1)[0])
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_bad_package_stops_startup_with_a_clear_message(model_package: Path, tmp_path: Path, damage: str):
    if damage == "missing":
        package, expected = tmp_path / "nowhere", "does not exist"
    else:
        import shutil

        package = Path(shutil.copytree(model_package, tmp_path / "package"))
        with (package / "labels.json").open("a") as handle:
            handle.write(" ")
        expected = "checksum mismatch for labels.json"
    with pytest.raises(StartupError, match=expected), TestClient(create_app(package, serve_settings())):
        pass


def test_metrics_move_after_requests(client: TestClient):
    labels = {"method": "POST", "route": "/v1/predict", "status": "200"}
    before = metric(client, "leaflens_http_requests_total", labels)
    bad_before = metric(client, "leaflens_http_requests_total", {**labels, "status": "415"})
    confidences_before = metric(client, "leaflens_prediction_confidence_count")
    path = sample_images(1)[0]
    body = post_image(client, path).json()
    client.post("/v1/predict", files={"file": ("x.jpg", b"plain text", "image/jpeg")})
    assert metric(client, "leaflens_http_requests_total", labels) == before + 1
    assert metric(client, "leaflens_http_requests_total", {**labels, "status": "415"}) == bad_before + 1
    assert metric(client, "leaflens_http_request_duration_seconds_count", labels) >= 1
    assert metric(client, "leaflens_prediction_confidence_count") == confidences_before + 1
    assert metric(client, "leaflens_predictions_total", {"class_name": body["top_k"][0]["name"]}) >= 1
    assert metric(client, "leaflens_input_errors_total", {"reason": "not_an_image"}) >= 1
    assert metric(client, "leaflens_batch_size_count") >= 1
    assert metric(client, "leaflens_model_load_seconds") > 0
    text = client.get("/metrics").text
    for name in ("leaflens_http_requests_total", "leaflens_not_sure_total", "leaflens_batch_size_bucket"):
        assert name in text


def test_micro_batching_gives_each_caller_its_own_answer(model_package: Path, engine: InferenceEngine):
    paths = sample_images(12)
    expected = {p.name: engine.predict_arrays([decode_image(p.read_bytes())])[0] for p in paths}
    # A long wait makes the requests meet in the batcher; every answer must still be its own image's.
    app = create_app(model_package, serve_settings(max_batch_size=8, max_wait_ms=300))
    answers: dict[str, dict] = {}
    errors: list[BaseException] = []
    with TestClient(app) as client:
        barrier = threading.Barrier(len(paths))

        def call(path: Path) -> None:
            try:
                barrier.wait()
                answers[path.name] = post_image(client, path).json()
            except BaseException as err:  # surfaced by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=call, args=(p,)) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        batches = metric(client, "leaflens_batch_size_count")
        images = metric(client, "leaflens_batch_size_sum")
    assert not errors
    assert set(answers) == set(expected)
    for name, body in answers.items():
        assert body["filename"] == name
        assert [d["name"] for d in body["top_k"]] == [s.name for s in expected[name].top_k]
        np.testing.assert_allclose(
            body["top_k"][0]["probability"], expected[name].best.probability, atol=1e-5
        )
    assert images == len(paths)
    assert batches < len(paths), "concurrent requests were never batched together"


def test_batching_off_still_answers(model_package: Path):
    with TestClient(create_app(model_package, serve_settings(max_batch_size=1))) as client:
        assert post_image(client, sample_images(1)[0]).status_code == 200
        assert metric(client, "leaflens_batch_size_sum") == 1


def test_summaries_are_stored_without_the_raw_image(
    model_package: Path, engine: InferenceEngine, tmp_path: Path
):
    from leaflens.monitoring import STAT_NAMES, SummaryStore, image_stats

    store_path = tmp_path / "summaries.sqlite"
    path = sample_images(1)[0]
    with TestClient(create_app(model_package, serve_settings(summaries_path=store_path))) as client:
        body = post_image(client, path).json()
        client.post(
            "/v1/predict", files={"file": ("x.jpg", b"nope", "image/jpeg")}
        )  # refused: not summarised
    with SummaryStore(store_path) as store:
        (summary,) = store.read()
    rgb = decode_image(path.read_bytes())
    assert set(STAT_NAMES) <= set(summary.stats)
    assert summary.stats == pytest.approx(image_stats(rgb))
    expected_embedding = engine.predict_arrays([rgb])[0].embedding
    np.testing.assert_allclose(summary.embedding, expected_embedding, rtol=1e-4, atol=1e-5)
    assert summary.image_jpeg is None
    assert summary.predicted in {body["top_k"][0]["name"], "abstain"}
    assert summary.model_version == body["model_version"]


def test_summaries_keep_the_image_only_when_opted_in(model_package: Path, tmp_path: Path):
    from leaflens.monitoring import SummaryStore

    store_path = tmp_path / "summaries.sqlite"
    settings = serve_settings(summaries_path=store_path, store_raw_images=True)
    with TestClient(create_app(model_package, settings)) as client:
        post_image(client, sample_images(1)[0])
    with SummaryStore(store_path) as store:
        (summary,) = store.read()
    assert summary.image_jpeg is not None and Image.open(io.BytesIO(summary.image_jpeg)).size == (256, 256)


def test_explain_returns_a_png_overlay(client: TestClient):
    pytest.importorskip("torch")
    body = post_image(client, sample_images(1)[0], explain="true").json()
    assert body["explanation_error"] is None, body["explanation_error"]
    prefix = "data:image/png;base64,"
    assert body["explanation"].startswith(prefix)
    overlay = Image.open(io.BytesIO(base64.b64decode(body["explanation"][len(prefix) :])))
    assert overlay.format == "PNG" and min(overlay.size) > 0


def test_cli_serve_refuses_a_missing_package(tmp_path: Path):
    leaflens = Path(sys.executable).with_name("leaflens")
    done = subprocess.run(
        [str(leaflens), "serve", f"package={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_cli_serve_answers_on_its_port(model_package: Path, tmp_path: Path):
    import time
    import urllib.request

    from leaflens.serving.server import free_port

    port = free_port()
    leaflens = Path(sys.executable).with_name("leaflens")
    command = [
        str(leaflens), "serve", f"package={model_package}", f"serve.port={port}",
        f"serve.summaries.path={tmp_path / 'summaries.sqlite'}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and process.poll() is None and body is None:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).read())
            except OSError:
                time.sleep(0.3)
        assert body is not None and body["ready"] is True, (
            process.stdout.read() if process.poll() else "timeout"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
