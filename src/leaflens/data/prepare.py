"""``leaflens data prepare``: validate, deduplicate, group by leaf and split ``data.raw_dir``.

Writes into ``data.processed_dir``:

- ``manifest.csv``: path (relative to ``data.raw_dir``), label, label_id, split, sha256, group, width, height;
- ``classes.json``: the full taxonomy (see :mod:`leaflens.data.taxonomy`);
- ``stats.json``: counts per class and split, train mean/std, rejections, dedup/grouping report, and the
  settings it was prepared with (:func:`preparation_settings`, compared by :func:`changed_settings`);
- ``rejected.json`` (every file left out, with its reason) and ``report.md`` (the same, readable);
- ``cache/<sha256>.npy`` (optional, ``data.cache.enabled``): images resized to ``data.cache.size``.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from leaflens import __version__
from leaflens.data.dedup import group_leaves
from leaflens.data.scan import ImageRecord, Rejection, list_files, scan_class_folders, validate_files
from leaflens.data.split import SPLITS, split_groups
from leaflens.data.taxonomy import build_classes, write_classes
from leaflens.images import decode_image
from leaflens.logs import logger

MANIFEST = "manifest.csv"
STATS = "stats.json"
REJECTED = "rejected.json"
REPORT = "report.md"
CACHE = "cache"
COLUMNS = ["path", "label", "label_id", "split", "sha256", "group", "width", "height"]
# The data settings a prepared directory depends on (besides the raw images): what is kept, how leaves are
# grouped and split, the class list and the resized cache.
SETTINGS = ("variant", "min_size", "max_pixels", "dedup", "split", "taxonomy", "cache")


def preparation_settings(data: DictConfig) -> dict[str, Any]:
    """The ``data`` settings (and leaflens version) that decide what ``prepare`` writes, as JSON values.

    Recorded in ``stats.json``; paths are left out so that the record is the same wherever the data lives.
    """
    settings = {
        key: OmegaConf.to_container(data[key], resolve=True) if OmegaConf.is_config(data[key]) else data[key]
        for key in SETTINGS
    }
    return json.loads(json.dumps({"leaflens": __version__, **settings}))


def recorded_settings(processed_dir: str | Path) -> dict[str, Any] | None:
    """The settings ``processed_dir`` was prepared with: ``None`` when it holds no prepared data, ``{}`` when it
    records none (prepared by hand, or by a leaflens from before they were recorded)."""
    processed_dir = Path(processed_dir)
    if not (processed_dir / MANIFEST).is_file() or not (processed_dir / STATS).is_file():
        return None
    return dict(json.loads((processed_dir / STATS).read_text(encoding="utf-8")).get("settings") or {})


def changed_settings(recorded: dict[str, Any], data: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, configured)}`` for every preparation setting that differs from ``data``'s."""
    current = preparation_settings(data)
    return {key: (recorded.get(key), value) for key, value in current.items() if recorded.get(key) != value}


def _train_mean_std(records: Sequence[ImageRecord]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over every pixel of ``records``."""
    if not records:
        return [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    pixels = float(sum(r.pixels for r in records))
    total = np.sum([r.channel_sum for r in records], axis=0)
    total_sq = np.sum([r.channel_sumsq for r in records], axis=0)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 0.0))
    return (mean / 255.0).round(6).tolist(), (std / 255.0).round(6).tolist()


def write_cache(paths: Sequence[Path], hashes: Sequence[str], cache_dir: Path, size: int) -> int:
    """Store each image, shorter side shrunk to ``size``, as ``<sha256>.npy``; returns the files written."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for path, sha in tqdm(list(zip(paths, hashes, strict=True)), desc="cache", unit="img", leave=False):
        target = cache_dir / f"{sha}.npy"
        if target.is_file():
            continue
        rgb = decode_image(path)
        scale = size / min(rgb.shape[:2])
        if scale < 1.0:
            new_size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
            rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_AREA)
        np.save(target, np.ascontiguousarray(rgb))
        written += 1
    return written


def _report_md(stats: dict[str, Any], rejections: list[dict[str, str]]) -> str:
    lines = [
        "# Data preparation report",
        "",
        f"- Raw data: `{stats['raw_dir']}` (variant `{stats['variant']}`)",
        f"- Files scanned: {stats['files_scanned']}; usable images: {stats['images']}; "
        f"rejected: {stats['rejected']['total']}",
        f"- Split (seed {stats['seed']}): " + ", ".join(f"{s} {stats['splits'][s]}" for s in SPLITS),
        f"- Train mean {stats['mean']}, std {stats['std']}",
        "",
        "## Duplicates and leaf groups",
        "",
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in stats["dedup"].items()]
    lines += [
        "",
        "## Classes",
        "",
        "| id | class | train | val | test | total |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in stats["classes"]:
        counts = stats["counts"].get(row["name"], {})
        cells = [str(counts.get(s, 0)) for s in (*SPLITS, "total")]
        lines.append(f"| {row['id']} | {row['name']} | " + " | ".join(cells) + " |")
    if stats["missing_classes"]:
        lines += ["", f"Taxonomy classes with no images: {', '.join(stats['missing_classes'])}"]
    if stats["extra_classes"]:
        lines += ["", f"Class folders outside the taxonomy (appended): {', '.join(stats['extra_classes'])}"]
    lines += ["", "## Rejected files", ""]
    if not rejections:
        lines.append("None.")
    else:
        lines += [f"- {reason}: {n}" for reason, n in stats["rejected"]["by_reason"].items()]
        lines += ["", "| file | class | reason | detail |", "|---|---|---|---|"]
        lines += [f"| `{r['path']}` | {r['label']} | {r['reason']} | {r['message']} |" for r in rejections]
    return "\n".join(lines) + "\n"


def prepare(cfg: DictConfig) -> Path:
    """Validate, deduplicate, group and split ``data.raw_dir`` into ``data.processed_dir`` (returned)."""
    data = cfg.data
    raw_dir = Path(data.raw_dir).resolve()
    out = Path(data.processed_dir).resolve()
    folders = scan_class_folders(raw_dir, variant=str(data.variant))

    files: list[tuple[Path, str]] = []
    rejections: list[Rejection] = []
    for folder, label in folders:
        found = list_files(folder)
        if not found:
            rejections.append(
                Rejection(folder, label, "empty_class_folder", "the class folder holds no files")
            )
        files += [(path, label) for path in found]
    logger.info("Validating {} files in {} class folders under {}", len(files), len(folders), raw_dir)
    records, bad = validate_files(
        files, int(data.min_size), int(data.max_pixels), int(data.get("workers", 2))
    )
    rejections += bad

    dedup = data.dedup
    grouped = group_leaves(records, int(dedup.phash_distance), int(dedup.series_window))
    rejections += grouped.rejections
    records = grouped.records
    if not records:
        raise ValueError(f"no usable image under {raw_dir}: see the rejections in {out / REJECTED}")

    counts = Counter(r.label for r in records)
    classes, extra = build_classes(list(data.taxonomy), counts)
    label_ids = {c["name"]: c["id"] for c in classes}
    splits = split_groups(
        [r.label for r in records],
        grouped.groups,
        float(data.split.val),
        float(data.split.test),
        int(data.split.seed),
    )

    manifest = pd.DataFrame(
        {
            "path": [r.path.relative_to(raw_dir).as_posix() for r in records],
            "label": [r.label for r in records],
            "label_id": [label_ids[r.label] for r in records],
            "split": splits,
            "sha256": [r.sha256 for r in records],
            "group": grouped.groups,
            "width": [r.width for r in records],
            "height": [r.height for r in records],
        },
        columns=COLUMNS,
    )
    out.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out / MANIFEST, index=False)
    write_classes(classes, out)

    per_class: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*SPLITS, "total"), 0))
    for label, split in zip(manifest["label"], manifest["split"], strict=True):
        per_class[label][split] += 1
        per_class[label]["total"] += 1
    mean, std = _train_mean_std([r for r, s in zip(records, splits, strict=True) if s == "train"])
    rejected = sorted((r.to_dict(raw_dir) for r in rejections), key=lambda r: (r["reason"], r["path"]))
    stats: dict[str, Any] = {
        "raw_dir": os.path.relpath(raw_dir, out),
        "variant": str(data.variant),
        "seed": int(data.split.seed),
        "split_fractions": {"val": float(data.split.val), "test": float(data.split.test)},
        "settings": preparation_settings(data),
        "files_scanned": len(files),
        "images": len(manifest),
        "splits": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
        "counts": {c["name"]: per_class[c["name"]] for c in classes if c["name"] in per_class},
        "mean": mean,
        "std": std,
        "rejected": {
            "total": len(rejected),
            "by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "files": rejected,
        },
        "dedup": grouped.report,
        "classes": [{"id": c["id"], "name": c["name"]} for c in classes],
        "missing_classes": [c["name"] for c in classes if c["count"] == 0],
        "extra_classes": extra,
        "empty_class_folders": [r["path"] for r in rejected if r["reason"] == "empty_class_folder"],
    }
    (out / STATS).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / REJECTED).write_text(json.dumps(rejected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / REPORT).write_text(_report_md(stats, rejected), encoding="utf-8")

    if data.cache.enabled:
        written = write_cache(
            [r.path for r in records], manifest["sha256"].tolist(), out / CACHE, data.cache.size
        )
        logger.info("Resized cache: {} new files in {}", written, out / CACHE)
    logger.info(
        "Prepared {} images ({}), {} rejected, {} leaf groups -> {}",
        len(manifest),
        ", ".join(f"{s} {stats['splits'][s]}" for s in SPLITS),
        len(rejected),
        grouped.report["groups"],
        out,
    )
    return out


def load_manifest(processed_dir: str | Path) -> pd.DataFrame:
    """The manifest of a prepared dataset, ``path`` made absolute (resolved against the recorded raw dir)."""
    processed_dir = Path(processed_dir)
    path = processed_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `leaflens data prepare` first (data.processed_dir)")
    manifest = pd.read_csv(path, dtype={"path": str, "label": str, "split": str, "sha256": str, "group": str})
    missing = set(COLUMNS) - set(manifest.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    stats = json.loads((processed_dir / STATS).read_text(encoding="utf-8"))
    raw_dir = (processed_dir / stats["raw_dir"]).resolve()
    manifest["path"] = [str(raw_dir / p) for p in manifest["path"]]
    return manifest
