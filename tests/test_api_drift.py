"""``GET /v1/drift``: the service's own inputs compared with the package's training reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from _serving import serve_settings
from leaflens.serving.api import create_app

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _post(client: TestClient, name: str, data: bytes) -> None:
    response = client.post("/v1/predict", files={"file": (name, data, "image/jpeg")})
    assert response.status_code == 200, response.text


def test_drift_route_reports_on_what_the_service_has_seen(model_package: Path, tmp_path: Path) -> None:
    app = create_app(model_package, serve_settings(summaries_path=tmp_path / "summaries.sqlite"))
    with TestClient(app) as client:
        empty = client.get("/v1/drift")
        assert empty.status_code == 200
        assert empty.json()["verdict"] == "insufficient_data"

        # Very dark copies of real leaves: what a failing camera or a night-time user sends.
        for path in sorted(SAMPLE.glob("*/*.JPG"))[:40]:
            dark = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) * 0.15).astype(np.uint8)
            buffer = Path(tmp_path / "dark.png")
            Image.fromarray(dark).save(buffer)
            _post(client, path.name, buffer.read_bytes())
        result = client.get("/v1/drift", params={"last_n": 40})
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["verdict"] == "drift"
        assert any("bright" in feature for feature in body["drifted_features"])


def test_drift_route_without_summaries_says_how_to_enable_them(model_package: Path) -> None:
    with TestClient(create_app(model_package, serve_settings())) as client:
        response = client.get("/v1/drift")
    assert response.status_code == 409
    assert "serve.summaries.enabled" in response.json()["error"]["message"]
