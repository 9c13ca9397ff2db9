"""Exact copies, near-duplicates and photo series -> leaf groups that must never straddle splits.

- Exact copies (same sha256): the first (by path) is kept, the others are rejected as ``duplicate``; copies
  filed under different classes are all rejected as ``conflicting_labels`` (we cannot tell which is right).
- Near-duplicates: 64-bit perceptual hashes within ``phash_distance`` bits, compared within a class
  (re-encoded, resized or lightly edited copies of one photo).
- Photo series: PlantVillage names files ``<uuid>___<series> <camera number>.JPG`` and shot each leaf several
  times in a row, so photos of the same class and series whose numbers lie within ``series_window`` of the
  first photo of a run are one leaf. Runs are anchored at their first number (not chained) so a dense series
  does not collapse into one giant group.

All links are merged with union-find; connected components are the leaf groups.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leaflens.data.scan import ImageRecord, Rejection
from leaflens.logs import logger

# "<series> <number>[.<n>][ copy[ <n>]]" after the uuid, e.g. "FREC_Scab 3524", "RS_NLB 3787 copy",
# "GH_HL Leaf 308.1", "black_rot1001".
_SERIES = re.compile(
    r"^(?P<series>.*?)[\s_-]*(?P<number>\d+)(?:\.\d+)?(?:\s*copy(?:\s*\d+)?)?$", re.IGNORECASE
)
# Above this many images per block the pairwise distance matrix is computed in slices (bounded memory).
_BLOCK = 2048


def parse_series(filename: str) -> tuple[str, int] | None:
    """``(series, camera number)`` of a PlantVillage file name, or ``None`` when it carries no number."""
    stem = Path(filename).stem
    stem = stem.split("___", 1)[1] if "___" in stem else stem
    match = _SERIES.match(stem.strip())
    if match is None:
        return None
    return match["series"].strip().lower(), int(match["number"])


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        # The smaller index stays the root, so group ids do not depend on merge order.
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


@dataclass
class DedupResult:
    """Kept records (sorted by path), their leaf group ids, rejections and a report."""

    records: list[ImageRecord]
    groups: list[str]
    rejections: list[Rejection]
    report: dict[str, Any] = field(default_factory=dict)


def remove_exact_duplicates(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[Rejection], int]:
    """Drop exact copies; returns kept records, rejections and the number of conflicting-label hashes."""
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: str(r.path)):
        by_hash[record.sha256].append(record)
    kept: list[ImageRecord] = []
    rejections: list[Rejection] = []
    conflicts = 0
    for copies in by_hash.values():
        labels = {r.label for r in copies}
        if len(labels) > 1:
            conflicts += 1
            names = ", ".join(str(r.path.name) for r in copies)
            for r in copies:
                rejections.append(
                    Rejection(
                        r.path,
                        r.label,
                        "conflicting_labels",
                        f"same bytes filed as {sorted(labels)}: {names}",
                    )
                )
            continue
        kept.append(copies[0])
        for r in copies[1:]:
            rejections.append(Rejection(r.path, r.label, "duplicate", f"exact copy of {copies[0].path.name}"))
    kept.sort(key=lambda r: str(r.path))
    return kept, rejections, conflicts


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``max_distance`` bits.

    Exhaustive but vectorised: one XOR + popcount row per image, ~n²/2 comparisons within one class
    (a 5,000-image class is ~12 M comparisons, well under a second).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    n = len(hashes)
    for start in range(0, n, _BLOCK):
        block = hashes[start : start + _BLOCK]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, start:])
        rows, cols = np.nonzero(distances <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i, j = start + r, start + c
            if i < j:
                pairs.append((i, j))
    return pairs


def series_runs(numbers: Sequence[tuple[int, int]], window: int) -> list[list[int]]:
    """Split ``(camera number, index)`` pairs of one series into runs spanning at most ``window`` numbers."""
    runs: list[list[int]] = []
    anchor = None
    for number, index in sorted(numbers):
        if anchor is None or number - anchor > window:
            runs.append([])
            anchor = number
        runs[-1].append(index)
    return runs


def group_leaves(records: Sequence[ImageRecord], phash_distance: int, series_window: int) -> DedupResult:
    """Deduplicate and group ``records`` into leaves (see the module docstring)."""
    kept, rejections, conflicts = remove_exact_duplicates(records)
    n = len(kept)
    uf = UnionFind(n)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(kept):
        by_class[record.label].append(i)

    near_pairs = 0
    near_images: set[int] = set()
    if phash_distance >= 0:
        for indices in by_class.values():
            hashes = np.array([kept[i].phash for i in indices], dtype=np.uint64)
            for a, b in near_duplicate_pairs(hashes, phash_distance):
                near_pairs += 1
                near_images.update((indices[a], indices[b]))
                uf.union(indices[a], indices[b])

    series_links = 0
    series_images: set[int] = set()
    unparsed = 0
    if series_window > 0:
        series: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for i, record in enumerate(kept):
            parsed = parse_series(record.path.name)
            if parsed is None:
                unparsed += 1
                continue
            series[(record.label, parsed[0])].append((parsed[1], i))
        for numbers in series.values():
            for run in series_runs(numbers, series_window):
                for other in run[1:]:
                    series_images.update((run[0], other))
                    if uf.union(run[0], other):
                        series_links += 1

    roots = [uf.find(i) for i in range(n)]
    groups = [f"g{root:06d}" for root in roots]
    sizes = Counter(groups)
    root_sizes = Counter(roots)
    for root, size in root_sizes.items():
        class_size = len(by_class[kept[root].label])
        if size > max(20, class_size // 10):
            logger.warning(
                "Leaf group {} holds {} of the {} images of {}: the split cannot stratify it well; "
                "lower data.dedup.phash_distance or data.dedup.series_window",
                groups[root], size, class_size, kept[root].label,
            )  # fmt: skip
    report = {
        "images_in": len(records),
        "images_kept": n,
        "exact_duplicates_removed": sum(r.reason == "duplicate" for r in rejections),
        "conflicting_label_hashes": conflicts,
        "conflicting_label_images": sum(r.reason == "conflicting_labels" for r in rejections),
        "phash_distance": phash_distance,
        "near_duplicate_pairs": near_pairs,
        "near_duplicate_images": len(near_images),
        "series_window": series_window,
        "series_grouped_images": len(series_images),
        "series_links": series_links,
        "names_without_series": unparsed,
        "groups": len(sizes),
        "groups_with_several_images": sum(1 for s in sizes.values() if s > 1),
        "largest_group": max(sizes.values(), default=0),
        "group_size_histogram": {str(k): v for k, v in sorted(Counter(sizes.values()).items())},
    }
    return DedupResult(records=kept, groups=groups, rejections=rejections, report=report)
