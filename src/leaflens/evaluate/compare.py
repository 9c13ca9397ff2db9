"""Paired comparison of two models scored on the same images.

Two recipes evaluated on one set of images differ mostly where one is right and the other wrong; the images both
get right (or both wrong) say nothing about which is better. McNemar's exact test asks whether the images B
fixed and the images it broke split further from even than tossing a fair coin for each of them would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar


@dataclass(frozen=True)
class PairedComparison:
    """Outcome of comparing model B against model A on the same images.

    Attributes:
        images: number of images both models scored.
        accuracy_a: top-1 of A.
        accuracy_b: top-1 of B.
        fixed: images B gets right and A wrong.
        broken: images A gets right and B wrong.
        p_value: two-sided exact McNemar p-value (binomial test on fixed vs broken).
    """

    images: int
    accuracy_a: float
    accuracy_b: float
    fixed: int
    broken: int
    p_value: float


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> PairedComparison:
    """Compare two models from per-image correctness on the same images, in the same order.

    Args:
        correct_a: boolean array, True where model A's prediction is right.
        correct_b: the same for model B.

    Raises:
        ValueError: if the arrays are empty or of different lengths.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two non-empty 1-d arrays of the same length, got {a.shape} and {b.shape}")
    fixed = int(np.sum(b & ~a))
    broken = int(np.sum(a & ~b))
    table = [[int(np.sum(a & b)), broken], [fixed, int(np.sum(~a & ~b))]]
    return PairedComparison(
        images=int(a.size),
        accuracy_a=float(a.mean()),
        accuracy_b=float(b.mean()),
        fixed=fixed,
        broken=broken,
        p_value=float(mcnemar(table, exact=True).pvalue),
    )
