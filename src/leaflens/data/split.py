"""Seeded, stratified, group-aware train/val/test split.

Every leaf group goes to exactly one split, so no copy or re-shoot of a leaf is seen in two splits. Within
each class, groups are shuffled with the seed and handed out largest first, each to the split that is the
least full relative to its target count (the class's image count times the split fractions). Large groups
are thus dealt out in proportion, like the small ones, and the single-photo groups at the end fill every split
to its target: every class keeps its share as closely as whole groups allow, and each split gets the same mix
of one-photo and many-photo leaves. (Handing each group to the split with the largest absolute shortfall
instead sends every large group to train first and leaves val and test mostly single-photo leaves, which are
harder to classify, so their scores would not represent the data.) A class with at least three groups always
gets at least one group in each split.
``group_kfold`` cuts the same kind of folds for cross-validation, and ``training_folds`` names those a model trains on.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def _targets(total: int, val: float, test: float) -> dict[str, int]:
    """Integer image targets per split (largest remainder, so they add up to ``total``)."""
    exact = {"train": total * (1.0 - val - test), "val": total * val, "test": total * test}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for key in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
        : total - sum(counts.values())
    ]:
        counts[key] += 1
    return counts


def split_groups(
    labels: Sequence[str], groups: Sequence[str], val: float, test: float, seed: int
) -> list[str]:
    """The split (``train``/``val``/``test``) of each item.

    Args:
        labels: Class of each item.
        groups: Leaf group of each item; a group must not span classes.
        val: Fraction of each class for validation.
        test: Fraction of each class for test.
        seed: Same seed, same split.
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups must have the same length")
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(
            f"split fractions must be in [0, 1) and leave room for train (val={val}, test={test})"
        )
    sizes: dict[str, int] = defaultdict(int)
    group_label: dict[str, str] = {}
    for label, group in zip(labels, groups, strict=True):
        if group_label.setdefault(group, label) != label:
            raise ValueError(f"group {group} spans classes {group_label[group]!r} and {label!r}")
        sizes[group] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, label in group_label.items():
        by_class[label].append(group)

    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    wanted = [s for s, f in (("train", 1.0), ("val", val), ("test", test)) if f > 0]
    for label in sorted(by_class):
        class_groups = sorted(by_class[label])
        rng.shuffle(class_groups)
        class_groups.sort(key=lambda g: sizes[g], reverse=True)  # stable: random order among equal sizes
        target = _targets(sum(sizes[g] for g in class_groups), val, test)
        filled = dict.fromkeys(SPLITS, 0)
        order = {"train": 0, "val": 1, "test": 2}  # ties (all empty): train first, then val and test
        for group in class_groups:
            split = min(
                wanted,
                key=lambda s: (filled[s] / target[s] if target[s] else math.inf, order[s]),
            )
            assignment[group] = split
            filled[split] += sizes[group]
        if len(class_groups) >= len(wanted):
            _ensure_every_split(class_groups, assignment, sizes, wanted)
    return [assignment[g] for g in groups]


def _ensure_every_split(
    class_groups: list[str], assignment: dict[str, str], sizes: dict[str, int], wanted: list[str]
) -> None:
    """Move the smallest group of the fullest split into any split left empty."""
    for split in wanted:
        members = {s: [g for g in class_groups if assignment[g] == s] for s in wanted}
        if members[split]:
            continue
        donor = max(wanted, key=lambda s: len(members[s]))
        assignment[min(members[donor], key=lambda g: (sizes[g], g))] = split


def group_kfold(labels: Sequence[str], groups: Sequence[str], folds: int, seed: int) -> list[int]:
    """The held-out fold (``0 .. folds-1``) of each item, for cross-validation.

    Every leaf group lies in one fold and each fold keeps about the class proportions of the whole
    (scikit-learn's ``StratifiedGroupKFold``), so a model trained on the other folds never saw the leaves it
    is scored on.

    Args:
        labels: Class of each item.
        groups: Leaf group of each item.
        folds: Number of folds (at least 2).
        seed: Same seed, same folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # only cross-validation needs it

    if len(labels) != len(groups):
        raise ValueError("labels and groups must have the same length")
    if folds < 2 or folds > len(set(groups)):
        raise ValueError(
            f"folds must be between 2 and the number of groups ({len(set(groups))}), got {folds}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = [-1] * len(labels)
    for fold, (_, held_out) in enumerate(splitter.split(labels, labels, groups)):
        for item in held_out:
            assignment[item] = fold
    return assignment


def training_folds(held_out: int, folds: int, count: int | None = None) -> list[int]:
    """The folds a cross-validation model trains on when ``held_out`` is scored.

    By default all the other folds. With ``count`` (1 .. folds-1), the ``count`` folds that follow ``held_out``
    (wrapping round), so every fold trains the same number of models: the points of a learning curve whose
    training sets are whole, stratified leaf groups like the full one, and whose every image is still scored
    once (by a model trained on ``count / folds`` of the data).
    """
    if not 0 <= held_out < folds:
        raise ValueError(f"held_out must be between 0 and {folds - 1}, got {held_out}")
    count = folds - 1 if count is None else count
    if not 1 <= count <= folds - 1:
        raise ValueError(f"count must be between 1 and {folds - 1} (the other folds), got {count}")
    return [(held_out + step) % folds for step in range(1, count + 1)]
