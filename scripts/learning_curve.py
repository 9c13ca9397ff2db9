"""Fit the learning curve of cross-validation runs that trained on different amounts of the data.

Each directory is a scripts/cross_validate.py output on the same prepared data, e.g. the recipe trained on 2, 3
and all 4 other folds of 5 (``--train-folds``), on one or more fold seeds:

    python scripts/learning_curve.py cv_m2 cv_m3 cv_m4 --at 2724 3202 --target 97.5

Every run must have scored the same images. The script fits a power law, error = a * n^-b, to the pooled top-1
error of each run against n, the mean number of training images of its models (least squares on the logarithms),
and predicts top-1 at the sizes given with ``--at`` and the training size that would reach ``--target``. Its
intervals come from resampling whole leaf groups (photos of one leaf are not independent trials), every run
with the same draw since they scored the same images; they cover that noise only, not the error of extrapolating
a power law beyond the sizes measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
from compare_cv import load_predictions

RESAMPLES = 2000


def mean_train_images(cv_dir: Path, experiment: str) -> float:
    """Mean number of images the run's fold models trained on."""
    rows = [json.loads(p.read_text()) for p in sorted((cv_dir / experiment).glob("fold_*/fold.json"))]
    if not rows:
        raise SystemExit(f"no {experiment}/fold_*/fold.json under {cv_dir}")
    return statistics.mean(row["train_images"] for row in rows)


def errors_by_group(runs: list[Path], experiment: str) -> tuple[pd.DataFrame, list[str]]:
    """Images and misclassified images per leaf group (rows) of every run (one ``wrong_<i>`` column each)."""
    merged = None
    for i, cv_dir in enumerate(runs):
        frame = load_predictions(cv_dir, experiment)
        frame = frame.assign(**{f"wrong_{i}": frame["predicted_id"] != frame["label_id"]})
        frame = frame[["path", "group", f"wrong_{i}"]]
        merged = frame if merged is None else merged.merge(frame, on=["path", "group"], how="outer")
    assert merged is not None
    columns = [f"wrong_{i}" for i in range(len(runs))]
    if merged[columns].isna().any().any():
        raise SystemExit("the runs scored different images: use runs made on the same prepared data")
    per_group = merged.groupby("group")[columns].sum().astype(float)
    per_group["images"] = merged.groupby("group").size()
    return per_group, columns


def fit_power_law(sizes: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of error = a * n^-b, by least squares on log(error) against log(n)."""
    slope, intercept = np.polyfit(np.log(sizes), np.log(errors), 1)
    return math.exp(intercept), -slope


def size_for_error(a: float, b: float, error: float) -> float:
    """Training size at which the fitted curve reaches ``error`` (infinite when the curve does not fall)."""
    if b <= 0:
        return math.inf
    exponent = math.log(a / error) / b
    return math.exp(exponent) if exponent < 700 else math.inf  # beyond ~1e304: no finite size


def interval(values: np.ndarray, decimals: int = 2) -> str:
    """The central 90 % of bootstrap values."""
    low, high = np.quantile(values, [0.05, 0.95])
    return f"{low:,.{decimals}f}-" + (f"{high:,.{decimals}f}" if np.isfinite(high) else "inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="cross_validate.py --out directories")
    parser.add_argument("--experiment", default="plantvillage_mini")
    parser.add_argument("--at", type=float, nargs="*", default=[], help="training sizes to predict top-1 at")
    parser.add_argument(
        "--target", type=float, default=None, help="top-1 (%%) whose training size to predict"
    )
    args = parser.parse_args()

    sizes = np.array([mean_train_images(run, args.experiment) for run in args.runs])
    if len(set(sizes.round())) < 2:
        parser.error("a learning curve needs runs trained on at least two different amounts of data")
    per_group, columns = errors_by_group(args.runs, args.experiment)
    wrong, images = per_group[columns].to_numpy(), per_group["images"].to_numpy()
    errors = wrong.sum(axis=0) / images.sum()
    if (errors == 0).any():
        raise SystemExit("a run without errors gives no curve to fit on a log scale")

    print(f"images scored by every run: {int(images.sum()):,} in {len(images):,} leaf groups")
    for run, n, error, count in zip(args.runs, sizes, errors, wrong.sum(axis=0), strict=True):
        print(f"{run}: trained on {n:,.0f} images, top-1 {100 * (1 - error):.2f} % ({int(count)} wrong)")
    a, b = fit_power_law(sizes, errors)

    # The same resampled leaf groups for every run, so the runs stay paired as they were scored. A resample is
    # the number of times it draws each group, so it costs one row per resample, not one per resample and run.
    rng = np.random.default_rng(0)
    times_drawn = rng.multinomial(len(images), np.full(len(images), 1 / len(images)), size=RESAMPLES)
    boot_errors = (times_drawn @ wrong) / (times_drawn @ images)[:, None]
    # A resample in which a run made no error has no logarithm; half an error stands in for it.
    boot_errors = np.maximum(boot_errors, 0.5 / images.sum())
    boot = [fit_power_law(sizes, e) for e in boot_errors]

    print(
        f"fit: error = {a:.4g} * n^-{b:.3f} (exponent b, 90 % interval {interval(np.array([x[1] for x in boot]))})"
    )
    for n in args.at:
        predicted = 100 * (1 - np.array([ba * n**-bb for ba, bb in boot]))
        print(
            f"predicted top-1 at {n:,.0f} training images: {100 * (1 - a * n**-b):.2f} % "
            f"(90 % interval {interval(predicted)})"
        )
    if args.target is not None:
        error = 1 - args.target / 100
        needed = np.array([size_for_error(ba, bb, error) for ba, bb in boot])
        print(
            f"training images for top-1 {args.target:g} %: {size_for_error(a, b, error):,.0f} "
            f"(90 % interval {interval(needed, decimals=0)})"
        )


if __name__ == "__main__":
    main()
