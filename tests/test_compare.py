"""Paired comparison of two models on the same images (McNemar's exact test)."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leaflens.evaluate.compare import paired_comparison


def test_counts_fixed_and_broken_images_and_gives_the_exact_two_sided_p_value() -> None:
    a = np.array([True] * 100 + [False] * 10)
    b = a.copy()
    b[:3] = False  # B breaks 3 images A got right
    b[100:] = True  # and fixes A's 10 errors

    result = paired_comparison(a, b)

    assert (result.images, result.fixed, result.broken) == (110, 10, 3)
    assert result.accuracy_a == pytest.approx(100 / 110)
    assert result.accuracy_b == pytest.approx(107 / 110)
    # Two-sided binomial tail of 3 or fewer of 13 discordant images under a fair coin.
    assert result.p_value == pytest.approx(2 * sum(comb(13, k) for k in range(4)) / 2**13)


def test_swapping_the_models_swaps_fixed_and_broken_and_keeps_p() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.9, rng.random(300) < 0.93
    forward, backward = paired_comparison(a, b), paired_comparison(b, a)
    assert (forward.fixed, forward.broken) == (backward.broken, backward.fixed)
    assert forward.p_value == pytest.approx(backward.p_value)


def test_identical_predictions_are_no_evidence_of_a_difference() -> None:
    a = np.array([True, False, True, True])
    assert paired_comparison(a, a).p_value == 1.0


def test_rejects_arrays_that_do_not_pair_up() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_comparison(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="non-empty"):
        paired_comparison(np.ones(0, bool), np.ones(0, bool))


def _write_cv_run(out: Path, predicted: list[int], labels: list[int]) -> Path:
    """A scripts/cross_validate.py output directory: predictions split over two folds."""
    half = len(labels) // 2
    for fold, rows in enumerate((slice(0, half), slice(half, None))):
        fold_dir = out / "plantvillage_mini" / f"fold_{fold}"
        fold_dir.mkdir(parents=True)
        paths = [f"img_{i}.jpg" for i in range(len(labels))][rows]
        frame = pd.DataFrame({"path": paths, "label_id": labels[rows], "predicted_id": predicted[rows]})
        frame.to_csv(fold_dir / "predictions.csv", index=False)
    return out


def _compare_cv(*runs: Path) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_cv.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, runs)], capture_output=True, text=True, check=False
    )


def test_compare_cv_script_compares_each_pair_of_fold_sets_and_pools_them(tmp_path: Path) -> None:
    labels = [0, 1, 2, 3] * 5

    def wrong(right: list[int], flips: set[int]) -> list[int]:
        return [(y + 1) % 4 if i in flips else y for i, y in enumerate(right)]

    # Fold set 1: the change fixes images 0-3 and breaks image 10; fold set 2: fixes 5, breaks 6 and 7.
    base_1 = _write_cv_run(tmp_path / "b1", wrong(labels, {0, 1, 2, 3}), labels)
    change_1 = _write_cv_run(tmp_path / "c1", wrong(labels, {10}), labels)
    base_2 = _write_cv_run(tmp_path / "b2", wrong(labels, {5}), labels)
    change_2 = _write_cv_run(tmp_path / "c2", wrong(labels, {6, 7}), labels)

    done = _compare_cv(base_1, change_1, base_2, change_2)

    assert done.returncode == 0, done.stderr
    pooled = done.stdout.split("== pooled over 2 pairs")[1]
    assert "images: 40" in pooled
    assert "b fixed 5, broke 3" in pooled
    assert done.stdout.count("b fixed 4, broke 1") == 1 and done.stdout.count("b fixed 1, broke 2") == 1
    assert "top-1 a: 87.50 %   b: 92.50 %" in pooled


def test_compare_cv_script_refuses_unpaired_runs_and_different_images(tmp_path: Path) -> None:
    labels = [0, 1] * 4
    base = _write_cv_run(tmp_path / "base", labels, labels)
    other = _write_cv_run(tmp_path / "other", labels[:6], labels[:6])

    odd = _compare_cv(base)
    assert odd.returncode != 0 and "pairs" in odd.stderr
    mismatch = _compare_cv(base, other)
    assert mismatch.returncode != 0 and "scored different images" in mismatch.stderr


def _write_curve_run(out: Path, train_images: int, wrong: int, images: int = 400) -> Path:
    """A cross_validate.py output of two folds whose models trained on ``train_images`` and got ``wrong`` of
    ``images`` wrong (each image its own leaf group)."""
    labels = [i % 4 for i in range(images)]
    predicted = [(y + 1) % 4 if i < wrong else y for i, y in enumerate(labels)]
    for fold, rows in enumerate((slice(0, images // 2), slice(images // 2, None))):
        fold_dir = out / "plantvillage_mini" / f"fold_{fold}"
        fold_dir.mkdir(parents=True)
        frame = pd.DataFrame(
            {
                "path": [f"img_{i}.jpg" for i in range(images)][rows],
                "group": [f"leaf_{i}" for i in range(images)][rows],
                "label_id": labels[rows],
                "predicted_id": predicted[rows],
            }
        )
        frame.to_csv(fold_dir / "predictions.csv", index=False)
        (fold_dir / "fold.json").write_text(json.dumps({"fold": fold, "train_images": train_images}))
    return out


def _learning_curve(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parents[1] / "scripts" / "learning_curve.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_learning_curve_script_fits_the_power_law_and_extrapolates_it(tmp_path: Path) -> None:
    # Error halves each time the training set doubles: 8 %, 4 %, 2 % = 80 * n^-1.
    runs = [
        _write_curve_run(tmp_path / f"m{n}", train_images=n, wrong=wrong)
        for n, wrong in ((1000, 32), (2000, 16), (4000, 8))
    ]

    done = _learning_curve(*runs, "--at", "8000", "--target", "99.5")

    assert done.returncode == 0, done.stderr
    assert "images scored by every run: 400 in 400 leaf groups" in done.stdout
    assert "trained on 2,000 images, top-1 96.00 % (16 wrong)" in done.stdout
    assert "fit: error = 80 * n^-1.000" in done.stdout
    assert "predicted top-1 at 8,000 training images: 99.00 %" in done.stdout
    assert "training images for top-1 99.5 %: 16,000" in done.stdout


def test_learning_curve_script_refuses_one_training_size_and_different_images(tmp_path: Path) -> None:
    a = _write_curve_run(tmp_path / "a", train_images=1000, wrong=10)
    same_size = _write_curve_run(tmp_path / "b", train_images=1000, wrong=5)
    fewer_images = _write_curve_run(tmp_path / "c", train_images=2000, wrong=5, images=300)

    one_size = _learning_curve(a, same_size)
    assert one_size.returncode != 0 and "at least two different amounts" in one_size.stderr
    mismatch = _learning_curve(a, fewer_images)
    assert mismatch.returncode != 0 and "scored different images" in mismatch.stderr


def _write_cv_run_with_logits(out: Path, predicted: list[int], labels: list[int], confidence: float) -> Path:
    """A cross_validate.py output whose folds also kept logits: ``confidence`` on the predicted class, 0 elsewhere."""
    _write_cv_run(out, predicted, labels)
    half = len(labels) // 2
    logits = np.zeros((len(labels), 4), dtype=np.float32)
    logits[np.arange(len(labels)), predicted] = confidence
    np.save(out / "plantvillage_mini" / "fold_0" / "logits.npy", logits[:half])
    np.save(out / "plantvillage_mini" / "fold_1" / "logits.npy", logits[half:])
    return out


def _cv_errors(*args: str | Path) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parents[1] / "scripts" / "cv_errors.py"
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_cv_errors_script_finds_shared_errors_and_scores_the_mean_probability_ensemble(
    tmp_path: Path,
) -> None:
    labels = [0, 1, 2, 3] * 5

    def wrong(flips: set[int]) -> list[int]:
        return [(y + 1) % 4 if i in flips else y for i, y in enumerate(labels)]

    # A misses images 0-2, B (more confident in each answer) misses 2 and 3: the mean of their probabilities
    # follows B wherever they disagree, so it fixes A's 0 and 1 and breaks A's 3; image 2 stays wrong in both.
    run_a = _write_cv_run_with_logits(tmp_path / "a", wrong({0, 1, 2}), labels, confidence=2.0)
    run_b = _write_cv_run_with_logits(tmp_path / "b", wrong({2, 3}), labels, confidence=4.0)
    # cross_validate.py copies the prepared classes.json into each fold's data; the script names classes from it.
    names = ["Corn___a", "Corn___b", "Tomato___c", "Tomato___d"]
    fold_data = run_a / "data" / "fold_0"
    fold_data.mkdir(parents=True)
    (fold_data / "classes.json").write_text(json.dumps([{"id": i, "name": n} for i, n in enumerate(names)]))

    done = _cv_errors(run_a, run_b, "--focus", "^Corn")

    assert done.returncode == 0, done.stderr
    assert "top-1 85.00 % (3 errors of 20)" in done.stdout  # A
    # A's errors on the focus (corn) classes: images 0 and 1, of the 10 corn images.
    assert "focus classes: 80.00 % of 10 images (2 errors); the others: 90.00 % of 10" in done.stdout
    assert (
        "1 images wrong in every run (0 of them in the focus classes), 3 wrong in some runs only"
        in done.stdout
    )
    ensemble = done.stdout.split("== ensemble")[1]
    assert "top-1 90.00 % (2 errors of 20)" in ensemble
    assert "fixed 2, broke 1" in ensemble


def test_cv_errors_script_refuses_runs_that_scored_different_images(tmp_path: Path) -> None:
    labels = [0, 1] * 4
    base = _write_cv_run(tmp_path / "base", labels, labels)
    other = _write_cv_run(tmp_path / "other", labels[:6], labels[:6])
    done = _cv_errors(base, other)
    assert done.returncode != 0 and "scored different images" in done.stderr


def test_cv_errors_script_refuses_logits_that_disagree_with_the_predictions(tmp_path: Path) -> None:
    labels = [0, 1, 2, 3] * 2
    run = _write_cv_run_with_logits(tmp_path / "run", labels, labels, confidence=2.0)
    # Fold 1's logits now point at another class than its predictions.csv says.
    np.save(run / "plantvillage_mini" / "fold_1" / "logits.npy", np.eye(4, dtype=np.float32)[[1, 2, 3, 0]])
    done = _cv_errors(run)
    assert done.returncode != 0 and "do not give their predictions.csv predictions" in done.stderr
