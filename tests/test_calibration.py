"""Temperature scaling and the abstain rule on synthetic logits whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from leaflens.evaluate.calibration import abstain_summary, calibrate, choose_threshold, fit_temperature, nll
from leaflens.serving.engine import softmax


def _overconfident(n: int = 3000, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # Gaussian class scores: the Bayes posterior is softmax(2 * x), so logits 5 * x are over-confident by
    # T = 2.5.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(0.0, 1.0, (n, classes))
    x[np.arange(n), labels] += 2.0
    return 5.0 * x, labels


def test_temperature_scaling_lowers_nll_and_recovers_the_true_temperature() -> None:
    logits, labels = _overconfident()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert nll(logits, labels, temperature) < nll(logits, labels, 1.0) - 0.1
    # Scaling never changes the predicted class.
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()


def test_underconfident_logits_get_a_temperature_below_one() -> None:
    logits, labels = _overconfident()
    assert fit_temperature(logits / 10.0, labels) == pytest.approx(0.25, rel=0.1)


def test_calibrate_reduces_ece_and_respects_the_false_abstain_budget() -> None:
    logits, labels = _overconfident(seed=1)
    result = calibrate(logits, labels, num_classes=6, max_false_abstain_rate=0.05)
    val = result["fit"]
    assert val["ece_after"] < val["ece_before"]
    assert val["nll_after"] < val["nll_before"]
    assert 0.0 < val["false_abstain_rate"] <= 0.05
    # Abstaining should catch wrong answers far more often than it withholds right ones.
    assert val["wrong_caught_rate"] > 3 * val["false_abstain_rate"]
    assert val["answered_accuracy"] >= (softmax(logits).argmax(1) == labels).mean()


def test_threshold_is_exact_on_a_hand_checked_case() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    correct = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    # 8 correct answers, 25 % may abstain -> 2 of them (0.2, 0.3): the threshold is the 3rd smallest, 0.4.
    threshold = choose_threshold(confidence, correct, 0.25)
    assert threshold == pytest.approx(0.4)
    summary = abstain_summary(confidence, correct, threshold)
    assert summary["false_abstain_rate"] == pytest.approx(2 / 8)
    assert summary["wrong_caught_rate"] == 1.0
    assert summary["answered_accuracy"] == 1.0
    assert choose_threshold(confidence, np.zeros(10, dtype=bool), 0.25) == 0.0
