"""Compare cross-validation runs of scripts/cross_validate.py image by image (McNemar's exact test).

Both runs of a pair must have scored the same images (the same prepared data and fold seed), e.g. the recipe and
the recipe with one override:

    python scripts/compare_cv.py outputs/cv_base outputs/cv_change --experiment plantvillage_mini

Prints top-1 of each, the images the second run fixed and broke, the exact McNemar p-value and top-1 per fold.
More pairs (the same comparison on other fold sets, each baseline followed by its change) are compared one by one
and then pooled:

    python scripts/compare_cv.py cv_base_s42 cv_change_s42 cv_base_s7 cv_change_s7

The pooled p-value treats every prediction as a separate trial, though each fold set scores the same images
again; read it as a summary of the sets, each of which has its own exact test above it.
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


def paired_correctness(a_dir: Path, b_dir: Path, experiment_a: str, experiment_b: str) -> pd.DataFrame:
    """Per-image correctness of two runs on the same images (columns ok_a, ok_b, fold)."""
    a = load_predictions(a_dir, experiment_a)
    b = load_predictions(b_dir, experiment_b)
    both = a.merge(b, on=["path", "label_id"], suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        raise SystemExit(
            f"{a_dir} and {b_dir} scored different images ({len(a)} and {len(b)}, {len(both)} in common): "
            "compare runs made on the same prepared data with the same fold seed"
        )
    return pd.DataFrame(
        {
            "ok_a": both["predicted_id_a"] == both["label_id"],
            "ok_b": both["predicted_id_b"] == both["label_id"],
            "fold": both["fold_a"],
        }
    )


def print_comparison(correct: pd.DataFrame, per_fold: bool) -> None:
    result = paired_comparison(correct["ok_a"].to_numpy(), correct["ok_b"].to_numpy())
    print(f"images: {result.images:,}")
    print(f"top-1 a: {100 * result.accuracy_a:.2f} %   b: {100 * result.accuracy_b:.2f} %")
    print(f"b fixed {result.fixed}, broke {result.broken}; exact McNemar p = {result.p_value:.3g}")
    if per_fold:
        for fold, row in correct.groupby("fold")[["ok_a", "ok_b"]].mean().iterrows():
            print(f"fold {fold}: a {100 * row.ok_a:.1f}  b {100 * row.ok_b:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="A B",
        help="--out directories in pairs: a baseline run, then the run compared against it",
    )
    parser.add_argument("--experiment", default="plantvillage_mini")
    parser.add_argument("--experiment-b", default=None, help="experiment of each run b, if it differs")
    args = parser.parse_args()
    if len(args.runs) % 2:
        parser.error(f"runs come in pairs (baseline, change), got an odd number: {len(args.runs)}")

    pairs = list(zip(args.runs[::2], args.runs[1::2], strict=True))
    compared = []
    for a_dir, b_dir in pairs:
        correct = paired_correctness(a_dir, b_dir, args.experiment, args.experiment_b or args.experiment)
        if len(pairs) > 1:
            print(f"== a {a_dir}  b {b_dir}")
        print_comparison(correct, per_fold=True)
        compared.append(correct)
    if len(pairs) > 1:
        print(f"== pooled over {len(pairs)} pairs")
        print_comparison(pd.concat(compared, ignore_index=True), per_fold=False)


if __name__ == "__main__":
    main()
