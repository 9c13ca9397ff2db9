"""Report figures with matplotlib (Agg backend, no display needed), sized so 38 class names stay readable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

DPI = 110


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def confusion_matrix_figure(cm: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (each row: where the images of one true class went)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(names)
    side = max(6.0, 0.32 * n + 3)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised; empty rows: class absent from the evaluated data)")
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(
            j,
            i,
            f"{norm[i, j]:.2f}".lstrip("0"),
            ha="center",
            va="center",
            fontsize=5,
            color="white" if norm[i, j] > 0.5 else "black",
        )
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.02)
    return _save(fig, path)


def per_class_f1_figure(per_class: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    """Horizontal F1 bars per class with the support; classes without images are marked, not drawn as zero."""
    n = len(per_class)
    fig, ax = plt.subplots(figsize=(9, max(4.0, 0.28 * n + 1)))
    f1 = [row["f1"] if row["support"] else 0.0 for row in per_class]
    colors = ["tab:green" if row["support"] else "lightgrey" for row in per_class]
    ax.barh(range(n), f1, color=colors)
    for i, row in enumerate(per_class):
        label = f"{row['f1']:.2f} (n={row['support']})" if row["support"] else "no images"
        ax.text(min(f1[i] + 0.01, 0.9), i, label, va="center", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("F1")
    ax.set_title("Per-class F1")
    return _save(fig, path)


def reliability_figure(
    before: Mapping[str, list[float]], after: Mapping[str, list[float]], ece: tuple[float, float], path: Path
) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, bins, title, value in zip(
        axes, (before, after), ("uncalibrated", "temperature-scaled"), ece, strict=True
    ):
        edges = np.asarray(bins["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        counts = np.asarray(bins["count"])
        acc = np.where(counts > 0, bins["accuracy"], np.nan)
        ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_title(f"{title}: ECE {value:.3f}")
        ax.set_xlabel("confidence (max probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def image_grid_figure(
    images: Sequence[np.ndarray], titles: Sequence[str], path: Path, title: str, ncols: int = 4
) -> Path:
    """A grid of RGB images with a short caption under each (galleries, Grad-CAM, augmentations)."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    if not images:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(title)
    return _save(fig, path)


def training_curves_figure(csv_paths: Sequence[Path], path: Path) -> Path | None:
    """Loss and metric curves from Lightning CSV logs (``metrics.csv``); ``None`` when there is no log."""
    frames = [pd.read_csv(p) for p in csv_paths if p.is_file() and p.stat().st_size > 0]
    if not frames:
        return None
    logs = pd.concat(frames, ignore_index=True)
    x_col = "epoch" if "epoch" in logs else "step"
    metrics = [
        c for c in logs.columns if c not in ("epoch", "step") and pd.api.types.is_numeric_dtype(logs[c])
    ]
    groups = {
        "loss": [c for c in metrics if "loss" in c],
        "accuracy / F1": [c for c in metrics if any(k in c for k in ("acc", "f1", "top"))],
    }
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (name, columns) in zip(axes[0], groups.items(), strict=True):
        for column in columns:
            series = logs[[x_col, column]].dropna().groupby(x_col)[column].mean()
            ax.plot(series.index, series.values, marker="o", ms=3, label=column)
        ax.set_xlabel(x_col)
        ax.set_title(name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)
