"""Monitoring: image statistics, request summaries, the append-only store, the package's drift reference."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SAMPLE_DIR
from leaflens.images import decode_image
from leaflens.monitoring import (
    STAT_NAMES,
    SummaryStore,
    image_stats,
    load_reference,
    make_summary,
    stats_matrix,
    write_reference,
)

LEAF = decode_image(sorted(SAMPLE_DIR.glob("Tomato___healthy/*"))[0])


def test_stats_of_a_real_leaf_are_complete_and_in_range() -> None:
    stats = image_stats(LEAF)
    assert tuple(stats) == STAT_NAMES
    assert all(np.isfinite(v) for v in stats.values())
    assert (stats["width"], stats["height"]) == (LEAF.shape[1], LEAF.shape[0])
    for key in ("brightness", "contrast", "saturation", "green_fraction", "dark_fraction", "bright_fraction"):
        assert 0.0 <= stats[key] <= 1.0
    assert stats["ratio_r"] + stats["ratio_g"] + stats["ratio_b"] == pytest.approx(1.0)
    assert stats["green_fraction"] > 0.2  # a leaf photo is largely green-to-yellow


def test_stats_follow_the_image() -> None:
    base = image_stats(LEAF)
    dark = image_stats((LEAF * 0.3).astype(np.uint8))
    blurred = image_stats(cv2.GaussianBlur(LEAF, (0, 0), 3.0))
    assert dark["brightness"] < 0.5 * base["brightness"] and dark["dark_fraction"] > base["dark_fraction"]
    assert blurred["sharpness"] < 0.2 * base["sharpness"]
    grey = image_stats(np.full((300, 200, 3), 128, np.uint8))
    assert (
        grey["ratio_r"] == pytest.approx(1 / 3) and grey["green_fraction"] == 0.0 and grey["sharpness"] == 0.0
    )
    assert grey["aspect"] == pytest.approx(200 / 300)


def test_sharpness_is_comparable_across_resolutions() -> None:
    # Computed at a fixed working size: the same photo at 4x the pixels keeps a similar sharpness.
    big = cv2.resize(LEAF, (LEAF.shape[1] * 4, LEAF.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    small, large = image_stats(LEAF)["sharpness"], image_stats(big)["sharpness"]
    native = cv2.Laplacian(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
    assert 0.25 < large / small < 4.0
    assert native / small < 0.05  # without the fixed working size the same photo would look 20x+ blurrier
    assert image_stats(big)["width"] == 4 * LEAF.shape[1]


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)]
)
def test_stats_refuse_what_is_not_an_rgb_image(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        image_stats(bad)


def test_summary_keeps_the_image_only_when_asked() -> None:
    plain = make_summary(
        LEAF, [0.1, 0.2], "Tomato___healthy", 0.9, model_version="v1", extra={"request": "a"}
    )
    assert (
        plain.image_jpeg is None and plain.embedding.dtype == np.float32 and plain.stats == image_stats(LEAF)
    )
    kept = make_summary(LEAF, np.ones(2), "Tomato___healthy", 0.9, keep_image=True)
    assert decode_image(kept.image_jpeg).shape == LEAF.shape
    record = plain.to_dict()
    assert json.loads(json.dumps(record))["embedding"] == pytest.approx([0.1, 0.2])
    assert record["has_image"] is False and record["extra"] == {"request": "a"}


def test_store_round_trip_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "summaries.db"
    with SummaryStore(path) as store:
        for i in range(10):
            store.append(
                make_summary(
                    LEAF, np.arange(4) + i, f"c{i}", i / 10, timestamp=1000.0 + i, model_version=f"v{i % 2}",
                    keep_image=i == 0, stats={"brightness": float(i)},
                )
            )  # fmt: skip
    with SummaryStore(path) as store:  # reopened: everything was persisted
        assert len(store) == 10
        records = store.read()
        assert [r.predicted for r in records] == [f"c{i}" for i in range(10)]
        assert np.array_equal(records[3].embedding, np.arange(4, dtype=np.float32) + 3)
        assert records[0].image_jpeg is not None and records[1].image_jpeg is None
        assert [r.timestamp for r in store.read(since=1003, until=1006)] == [1003.0, 1004.0, 1005.0]
        assert [r.predicted for r in store.read(limit=2)] == ["c8", "c9"]  # the latest, in time order
        assert {r.model_version for r in store.read(model_version="v1")} == {"v1"}
        matrix = stats_matrix([r.stats for r in records])
    assert matrix.shape == (10, len(STAT_NAMES))
    assert matrix[4, STAT_NAMES.index("brightness")] == 4.0
    assert np.isnan(matrix[4, STAT_NAMES.index("sharpness")])  # missing stats are NaN, never a silent 0


def test_store_takes_concurrent_appends_from_threads(tmp_path: Path) -> None:
    store = SummaryStore(tmp_path / "s.db")
    summary = make_summary(LEAF, np.zeros(8), "x", 0.5)

    def worker() -> None:
        for _ in range(25):
            store.append(summary)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 200
    store.close()


def _append_many(path: str, n: int) -> None:
    store = SummaryStore(path)
    for i in range(n):
        store.append(make_summary(np.full((64, 64, 3), i % 255, np.uint8), np.zeros(4), "p", 0.1))
    store.close()


def test_store_takes_concurrent_appends_from_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    SummaryStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, 40)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    with SummaryStore(path) as store:
        assert len(store) == 80


def _mean_colour(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([img.reshape(-1, 3).mean(axis=0) for img in images]).astype(np.float32)


class _Engine:
    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return _mean_colour(images)


def test_reference_round_trip_skips_unreadable_files(tmp_path: Path) -> None:
    paths = sorted(SAMPLE_DIR.glob("Apple___healthy/*"))[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    written = write_reference(
        tmp_path / "pkg", _Engine(), [*paths, broken, LEAF], batch_size=2, source="test"
    )
    assert [p.name for p in written] == ["reference.json", "reference.npz"]
    reference = load_reference(tmp_path / "pkg")
    assert reference.embeddings.shape == (6, 3) and reference.stats_array().shape == (6, len(STAT_NAMES))
    assert np.allclose(reference.embeddings[-1], _mean_colour([LEAF])[0])
    assert reference.meta["skipped"][0]["path"] == str(broken) and reference.meta["source"] == "test"
    assert reference.stats[0] == image_stats(decode_image(paths[0]))
    # A plain callable works too, and max_images caps the sample.
    write_reference(tmp_path / "pkg2", _mean_colour, paths, max_images=3)
    assert load_reference(tmp_path / "pkg2").embeddings.shape == (3, 3)


def test_reference_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="re-export"):
        load_reference(tmp_path)
    with pytest.raises(ValueError, match="no readable images"):
        write_reference(tmp_path, _Engine(), [tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="embedder returned"):
        write_reference(tmp_path, lambda images: np.zeros((1, 2)), [LEAF, LEAF])
    write_reference(tmp_path / "pkg", _Engine(), [LEAF, LEAF])
    np.savez(tmp_path / "pkg" / "reference.npz", embeddings=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="embeddings"):
        load_reference(tmp_path / "pkg")


def test_monitoring_stays_off_the_training_stack() -> None:
    code = (
        "import sys, leaflens.monitoring; "
        "print(sorted(m for m in ('torch', 'lightning', 'timm', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
