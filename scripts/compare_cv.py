"""Compare two cross-validation runs of scripts/cross_validate.py image by image (McNemar's exact test).

Both runs must have scored the same images (the same prepared data and fold seed), e.g. the recipe and the recipe
with one override:

    python scripts/compare_cv.py outputs/cv_base outputs/cv_change --experiment plantvillage_mini

Prints top-1 of each, the images the second run fixed and broke, the exact McNemar p-value and top-1 per fold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from leaflens.evaluate.compare import paired_comparison


def load_predictions(cv_dir: Path, experiment: str) -> pd.DataFrame:
    """Every held-out prediction of one experiment of a cross-validation run, with its fold."""
    files = sorted((cv_dir / experiment).glob("fold_*/predictions.csv"))
    if not files:
        raise SystemExit(f"no {experiment}/fold_*/predictions.csv under {cv_dir}")
    return pd.concat(
        pd.read_csv(f).assign(fold=int(f.parent.name.removeprefix("fold_"))) for f in files
    ).reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="--out directory of the baseline run")
    parser.add_argument("b", type=Path, help="--out directory of the run compared against it")
    parser.add_argument("--experiment", default="plantvillage_mini")
    parser.add_argument("--experiment-b", default=None, help="experiment of run b, if it differs")
    args = parser.parse_args()

    a = load_predictions(args.a, args.experiment)
    b = load_predictions(args.b, args.experiment_b or args.experiment)
    both = a.merge(b, on=["path", "label_id"], suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(
            f"the runs scored different images ({len(a)} and {len(b)}, {len(both)} in common): "
            "compare runs made on the same prepared data with the same fold seed"
        )
    correct_a = (both["predicted_id_a"] == both["label_id"]).to_numpy()
    correct_b = (both["predicted_id_b"] == both["label_id"]).to_numpy()
    result = paired_comparison(correct_a, correct_b)
    print(f"images: {result.images:,}")
    print(f"top-1 a: {100 * result.accuracy_a:.2f} %   b: {100 * result.accuracy_b:.2f} %")
    print(f"b fixed {result.fixed}, broke {result.broken}; exact McNemar p = {result.p_value:.3g}")
    per_fold = both.assign(ok_a=correct_a, ok_b=correct_b).groupby("fold_a")[["ok_a", "ok_b"]].mean()
    for fold, row in per_fold.iterrows():
        print(f"fold {fold}: a {100 * row.ok_a:.1f}  b {100 * row.ok_b:.1f}")


if __name__ == "__main__":
    main()
