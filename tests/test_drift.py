"""Drift: darkened, blurred and non-leaf batches are flagged; a fresh batch of the same distribution is not.

Real images throughout: the reference is PlantVillage-mini (minus the photos copied into the bundled sample),
the fresh batch is the bundled sample, the non-leaf batch comes from ``skimage.data``; embeddings are the real
ImageNet MobileNetV3-Small's pooled features. Marked slow: ~60-140 s on 2 shared cores (model + Evidently).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from conftest import SAMPLE_DIR, SHARED_MINI, compose
from leaflens.images import decode_image
from leaflens.monitoring import (
    SummaryStore,
    image_stats,
    load_reference,
    make_summary,
    stats_matrix,
    write_reference,
)
from leaflens.ops.drift import DriftOptions, check_drift, compare, drift

WEIGHTS = SHARED_MINI.parents[1] / "weights" / "tf_mobilenetv3_small_100.safetensors"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"needs PlantVillage-mini at {SHARED_MINI}"),
]

N_REFERENCE = 160
N_CURRENT = 48
NON_LEAF = [
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
    "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "cat", "brick", "gravel", "clock",
]  # fmt: skip


class TimmEmbedder:
    """The real pretrained backbone's pooled features, preprocessed with its own timm data config."""

    def __init__(self) -> None:
        import timm
        import torch
        from safetensors.torch import load_file

        from leaflens.preprocessing import spec_from_data_config

        self.torch = torch
        self.model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False)
        self.model.load_state_dict(load_file(WEIGHTS))
        self.model.reset_classifier(0)
        self.model.eval()
        self.spec = spec_from_data_config(timm.data.resolve_data_config({}, model=self.model))

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        from leaflens.preprocessing import preprocess_batch

        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(preprocess_batch(images, self.spec))).numpy()


def _images(paths: list[Path]) -> list[np.ndarray]:
    return [decode_image(p) for p in paths]


@pytest.fixture(scope="module")
def embedder() -> TimmEmbedder:
    return TimmEmbedder()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, embedder: TimmEmbedder) -> Path:
    """A package directory holding only a drift reference built from PlantVillage-mini."""
    sample_names = {p.name for p in SAMPLE_DIR.glob("*/*")}
    pool = sorted(
        p for p in SHARED_MINI.glob("*/*") if p.name not in sample_names and p.suffix.lower() == ".jpg"
    )
    rng = np.random.default_rng(0)
    chosen = [pool[i] for i in rng.choice(len(pool), N_REFERENCE, replace=False)]
    root = tmp_path_factory.mktemp("package")
    (root / "model.json").write_text(json.dumps({"version": "test-1"}))
    write_reference(root, embedder, chosen, batch_size=48, source="plantvillage-mini")
    return root


@pytest.fixture(scope="module")
def fresh() -> list[np.ndarray]:
    paths = sorted(p for p in SAMPLE_DIR.glob("*/*") if p.suffix.lower() == ".jpg")
    rng = np.random.default_rng(1)
    return _images([paths[i] for i in rng.choice(len(paths), N_CURRENT, replace=False)])


def _non_leaf() -> list[np.ndarray]:
    """Random 256 px crops of skimage's sample photos (people, animals, objects, microscopy, text)."""
    rng = np.random.default_rng(2)
    out = []
    for name in NON_LEAF:
        image = getattr(skimage.data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        for _ in range(3):
            h, w = image.shape[:2]
            side = min(h, w, int(rng.integers(160, 400)))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            out.append(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return out[:N_CURRENT]


BATCHES = {
    "darkened": lambda imgs: [(img * 0.35).astype(np.uint8) for img in imgs],
    "blurred": lambda imgs: [cv2.GaussianBlur(img, (0, 0), 3.0) for img in imgs],
    "non_leaf": lambda imgs: _non_leaf(),
}


def _options(**overrides) -> DriftOptions:
    """The configured drift options (``configs/ops/default.yaml``), with ``overrides``."""
    return DriftOptions.from_config({**compose(task_name="drift").drift, **overrides})


def _compare(package: Path, embedder: TimmEmbedder, images: list[np.ndarray]) -> dict:
    reference = load_reference(package)
    stats = stats_matrix([image_stats(img) for img in images])
    result, snapshot = compare(reference, stats, embedder.embed(images), _options())
    assert snapshot is None  # no HTML report unless asked for
    return result


def test_reference_round_trip(package: Path) -> None:
    reference = load_reference(package)
    assert reference.embeddings.shape == (N_REFERENCE, 1024)
    assert np.isfinite(reference.embeddings).all()
    assert reference.stats_array().shape == (N_REFERENCE, 16)
    assert reference.meta["source"] == "plantvillage-mini" and reference.meta["n_images"] == N_REFERENCE


def test_fresh_batch_from_same_distribution_is_not_drift(package, embedder, fresh) -> None:
    result = _compare(package, embedder, fresh)
    assert result["verdict"] == "no_drift", result["drifted_features"]
    assert result["embedding"]["drift"] is False
    assert len(result["tests"]) == 16 + 5  # every image statistic + 5 embedding components


@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_shifted_batch_is_drift(package, embedder, fresh, kind) -> None:
    result = _compare(package, embedder, BATCHES[kind](fresh))
    assert result["verdict"] == "drift"
    expected = {"darkened": "brightness", "blurred": "sharpness", "non_leaf": "green_fraction"}[kind]
    assert expected in result["drifted_features"]


def test_too_few_summaries_gives_no_verdict(package, embedder, fresh) -> None:
    reference = load_reference(package)
    images = fresh[:5]
    result, snapshot = compare(
        reference, stats_matrix([image_stats(i) for i in images]), embedder.embed(images), _options()
    )
    assert result["verdict"] == "insufficient_data" and snapshot is None


def test_embedding_size_mismatch_is_refused(package) -> None:
    reference = load_reference(package)
    with pytest.raises(ValueError, match="another model"):
        compare(reference, reference.stats_array()[:30], np.zeros((30, 8), np.float32), _options())


def test_drift_command_reads_the_store_and_writes_reports(package, embedder, fresh, tmp_path: Path) -> None:
    store_path = tmp_path / "summaries.db"
    dark = BATCHES["darkened"](fresh)
    with SummaryStore(store_path) as store:
        for img, vector in zip(dark, embedder.embed(dark), strict=True):
            store.append(make_summary(img, vector, "Apple___healthy", 0.9, model_version="test-1"))
        # Another model version's summaries must not be mixed in (different embedding size on purpose).
        store.append(make_summary(fresh[0], np.zeros(8), "x", 0.5, model_version="old"))
    cfg = compose(
        f"package={package}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"drift.store={store_path}",
        task_name="drift",
    )
    out = drift(cfg)
    result = json.loads((out / "drift.json").read_text())
    assert result["verdict"] == "drift" and result["n_current"] == N_CURRENT
    assert "brightness" in (out / "drift.md").read_text()
    assert (out / "drift.html").stat().st_size > 10_000

    api_result = check_drift(package, store_path, options=_options(min_samples=10_000))
    assert api_result["verdict"] == "insufficient_data" and api_result["window"]["model_version"] == "test-1"


def test_drift_errors_name_the_fix(package, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="monitoring store"):
        check_drift(package, tmp_path / "missing.db", options=_options())
    with pytest.raises(FileNotFoundError, match="re-export"):
        check_drift(tmp_path, tmp_path / "missing.db", options=_options())
    with pytest.raises(ValueError, match="package="):
        drift(compose(task_name="drift"))
