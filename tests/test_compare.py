"""Paired comparison of two models on the same images (McNemar's exact test)."""

from __future__ import annotations

from math import comb

import numpy as np
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
