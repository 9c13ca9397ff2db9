"""Metrics against a hand-checked case, and the real evaluate stage on a trained run: every artefact is
written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import SAMPLE_DIR, compose, data_overrides
from leaflens.data.prepare import load_manifest
from leaflens.evaluate.metrics import classification_metrics, expected_calibration_error, top_k_accuracy

NAMES = ["a", "b", "c"]
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.6, 0.3, 0.1],  # a -> a
        [0.3, 0.6, 0.1],  # a -> b (a second)
        [0.1, 0.6, 0.3],  # b -> b
        [0.2, 0.7, 0.1],  # b -> b
        [0.1, 0.2, 0.7],  # c -> c
        [0.6, 0.3, 0.1],  # c -> a (c last)
    ]
)


def test_metrics_match_a_hand_checked_case() -> None:
    m = classification_metrics(PROBS, LABELS, NAMES, n_bins=10)
    assert m["top1"] == pytest.approx(4 / 6)
    assert top_k_accuracy(PROBS, LABELS, 2) == pytest.approx(5 / 6)
    assert m["top5"] == 1.0  # k is capped at the number of classes
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    per_class = {row["name"]: row for row in m["per_class"]}
    # a: TP 1, FP 1, FN 1; b: TP 2, FP 1, FN 0; c: TP 1, FP 0, FN 1.
    assert (per_class["a"]["precision"], per_class["a"]["recall"], per_class["a"]["f1"]) == pytest.approx(
        (0.5, 0.5, 0.5)
    )
    assert (per_class["b"]["precision"], per_class["b"]["recall"], per_class["b"]["f1"]) == pytest.approx(
        (2 / 3, 1.0, 0.8)
    )
    assert (per_class["c"]["precision"], per_class["c"]["recall"], per_class["c"]["f1"]) == pytest.approx(
        (1.0, 0.5, 2 / 3)
    )
    assert [row["support"] for row in m["per_class"]] == [2, 2, 2]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert {(p["true"], p["predicted"]) for p in m["most_confused"]} == {("a", "b"), ("c", "a")}
    # One bin: |mean confidence - accuracy| = |3.8 / 6 - 4 / 6|.
    assert expected_calibration_error(PROBS, LABELS, 3, n_bins=1) == pytest.approx(0.2 / 6, abs=1e-6)


def test_macro_f1_ignores_classes_absent_from_the_labels() -> None:
    probs = np.hstack([PROBS, np.zeros((6, 1))])  # a 4th declared class with no images
    m = classification_metrics(probs, LABELS, [*NAMES, "d"])
    assert m["classes_present"] == 3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["per_class"][3]["support"] == 0


def test_folder_evaluation_reports_unknown_folders(tmp_path: Path) -> None:
    from leaflens.evaluate.run import folder_eval_set

    classes = [{"id": 0, "name": "Apple___healthy"}, {"id": 1, "name": "Grape___healthy"}]
    for name in ("Apple___healthy", "Grape___healthy"):
        shutil.copytree(SAMPLE_DIR / name, tmp_path / name)
    (tmp_path / "Banana___Black_sigatoka").mkdir()
    shutil.copy(next((SAMPLE_DIR / "Apple___healthy").iterdir()), tmp_path / "Banana___Black_sigatoka")
    frame, unknown = folder_eval_set(tmp_path, classes, "color")
    assert unknown == ["Banana___Black_sigatoka"]
    assert set(frame["label_id"]) == {0, 1}
    assert len(frame) == len(list((tmp_path / "Apple___healthy").iterdir())) + len(
        list((tmp_path / "Grape___healthy").iterdir())
    )


@pytest.mark.slow
@pytest.mark.parametrize("train_splits", [["train", "val"], ["train"]])
def test_evaluate_writes_report_figures_and_calibration(
    tmp_path: Path, prepared_root: Path, trained_run: Path, train_splits: list[str]
) -> None:
    from leaflens.evaluate.run import evaluate

    run = tmp_path / "run"  # a copy: evaluate writes calibration.json into the run, others share trained_run
    shutil.copytree(trained_run, run)
    run_cfg = OmegaConf.load(run / "config.yaml")
    run_cfg.data.train_splits = train_splits  # what the run says it trained on decides the calibration set
    OmegaConf.save(run_cfg, run / "config.yaml")
    out = tmp_path / "report"
    cfg = compose(
        *data_overrides(prepared_root), f"run={run}", f"paths.output_dir={out}",
        "evaluate.gradcam_samples=2", "evaluate.worst_mistakes=4", task_name="evaluate",
    )  # fmt: skip
    assert evaluate(cfg) == out

    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    for name in ("confusion_matrix", "per_class_f1", "reliability", "worst_mistakes", "gradcam_correct",
                 "gradcam_wrong", "training_curves", "augmentations"):  # fmt: skip
        assert f"figures/{name}.png" in links, name
    for link in links:
        assert (out / link).is_file() and (out / link).stat().st_size > 1000, link

    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.sum() == test["images"] == sum(row["support"] for row in test["per_class"])
    assert test["top1"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    assert 0.0 <= test["top1"] <= test["top5"] <= 1.0
    assert metrics["non_leaf"]["images"] >= 10 and 0.0 <= metrics["non_leaf"]["abstain_rate"] <= 1.0

    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["temperature"] > 0
    assert calibration["fit"]["nll_after"] <= calibration["fit"]["nll_before"] + 1e-9
    assert calibration["fit"]["false_abstain_rate"] <= calibration["abstain"]["max_false_abstain_rate"]
    # Calibration is fitted on held-out images only: test when validation was trained on.
    fit_split = "test" if "val" in train_splits else "val"
    manifest = load_manifest(prepared_root / "processed")
    assert calibration["fitted_on"] == fit_split
    assert calibration["fit"]["images"] == int((manifest["split"] == fit_split).sum())
    assert ("the ECE and abstain figures of that set are in-sample" in report) == (fit_split == "test")
    assert json.loads((run / "evaluation.json").read_text())["test"]["top1"] == pytest.approx(test["top1"])


def test_scoring_skips_unreadable_files_on_record(model_package: Path, tmp_path: Path) -> None:
    from leaflens.evaluate.scoring import score_paths
    from leaflens.serving.engine import InferenceEngine

    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    good = sorted((SAMPLE_DIR / "Apple___healthy").iterdir())[:2]
    scores = score_paths(InferenceEngine.from_package(model_package), [good[0], bad, good[1]], batch_size=2)
    assert scores.index.tolist() == [0, 2]
    assert scores.logits.shape[0] == scores.embedding.shape[0] == 2
    assert [f["path"] for f in scores.failed] == [str(bad)] and scores.failed[0]["reason"] == "not_an_image"
