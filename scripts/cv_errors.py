"""Where the errors of cross-validation runs are, and what an ensemble of the runs would score.

Every run must have scored the same images (scripts/cross_validate.py on the same prepared data and fold seed),
e.g. the recipe trained with two seeds on one fold set:

    python scripts/cv_errors.py outputs/cv_seed42 outputs/cv_seed43

Prints, for each run: top-1, the most confused class pairs, and top-1 within and outside a group of classes
(``--focus``, regexes over class names; by default the two corn leaf-spot diseases that PlantVillage models
confuse most). Then, across the runs: how many images every run got wrong, how many only some did, and, where every
fold of every run kept its held-out logits (``logits.npy``), the top-1 of the mean of the runs' softmax
probabilities against the first run (McNemar's exact test). An ensemble of k runs costs k times the training, the
adapter parameters and the serving compute of one: it measures what variance across training runs is worth, not a
recipe within the budget.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from compare_cv import load_predictions
from scipy.special import softmax
from sklearn.metrics import confusion_matrix

from leaflens.data.taxonomy import load_classes
from leaflens.evaluate.compare import paired_comparison
from leaflens.evaluate.metrics import most_confused_pairs

CORN_LEAF_SPOTS = [r"^Corn_\(maize\)___Cercospora", r"^Corn_\(maize\)___Northern_Leaf_Blight"]


def load_cv_run(cv_dir: Path, experiment: str) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Held-out predictions of one run, sorted by path, and their logits (None unless every fold kept them)."""
    predictions = load_predictions(cv_dir, experiment)
    # Each fold's logits, in the order its rows appear in the concatenated predictions.
    logit_files = [cv_dir / experiment / f"fold_{k}" / "logits.npy" for k in predictions["fold"].unique()]
    logits = None
    if all(f.exists() for f in logit_files):
        logits = np.concatenate([np.load(f) for f in logit_files])
        if len(logits) != len(predictions) or not np.array_equal(
            logits.argmax(axis=1), predictions["predicted_id"].to_numpy()
        ):
            raise SystemExit(f"{cv_dir}: the folds' logits.npy do not give their predictions.csv predictions")
    order = np.argsort(predictions["path"].to_numpy(), kind="stable")
    return predictions.iloc[order].reset_index(drop=True), None if logits is None else logits[order]


def focus_mask(labels: np.ndarray, names: list[str], patterns: list[str]) -> np.ndarray:
    """Images whose true class matches any of the regexes."""
    ids = [i for i, name in enumerate(names) if any(re.search(p, name) for p in patterns)]
    return np.isin(labels, ids)


def describe_run(
    name: str, labels: np.ndarray, predicted: np.ndarray, names: list[str], focus: np.ndarray, top: int
) -> None:
    correct = predicted == labels
    print(
        f"== {name}: top-1 {100 * correct.mean():.2f} % ({int((~correct).sum())} errors of {len(labels):,})"
    )
    if focus.any():
        print(
            f"   focus classes: {100 * correct[focus].mean():.2f} % of {int(focus.sum())} images "
            f"({int((~correct[focus]).sum())} errors); the others: {100 * correct[~focus].mean():.2f} % of "
            f"{int((~focus).sum())}"
        )
    cm = confusion_matrix(labels, predicted, labels=np.arange(len(names)))
    for pair in most_confused_pairs(cm, names, top=top):
        print(f"   {pair['count']:3d}  {pair['true']} -> {pair['predicted']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="--out directories of scripts/cross_validate.py")
    parser.add_argument("--experiment", default="plantvillage_mini")
    parser.add_argument("--focus", nargs="*", default=CORN_LEAF_SPOTS, help="regexes over class names")
    parser.add_argument("--top", type=int, default=8, help="confused pairs to list per run")
    args = parser.parse_args()

    loaded = [load_cv_run(run, args.experiment) for run in args.runs]
    reference = loaded[0][0]
    for run, (frame, _) in zip(args.runs[1:], loaded[1:], strict=True):
        if not frame["path"].equals(reference["path"]) or not frame["label_id"].equals(reference["label_id"]):
            raise SystemExit(
                f"{args.runs[0]} and {run} scored different images: compare runs made on the same prepared data "
                "with the same fold seed"
            )
    labels = reference["label_id"].to_numpy()
    logits_all = [logits for _, logits in loaded]
    # The class list the runs trained with: cross_validate.py copies the prepared classes.json into each fold.
    names = [record["name"] for record in load_classes(args.runs[0] / "data" / "fold_0")]
    focus = focus_mask(labels, names, args.focus)

    predicted = [frame["predicted_id"].to_numpy() for frame, _ in loaded]
    for run, pred in zip(args.runs, predicted, strict=True):
        describe_run(str(run), labels, pred, names, focus, args.top)
    if len(loaded) < 2:
        return
    wrong = np.stack([pred != labels for pred in predicted])
    print(
        f"== across {len(loaded)} runs: {int(wrong.all(axis=0).sum())} images wrong in every run "
        f"({int((wrong.all(axis=0) & focus).sum())} of them in the focus classes), "
        f"{int((wrong.any(axis=0) & ~wrong.all(axis=0)).sum())} wrong in some runs only"
    )
    if any(lg is None for lg in logits_all):
        print("   ensemble: not every fold kept logits.npy (runs made before it was written)")
        return
    probabilities = np.mean([softmax(lg, axis=1) for lg in logits_all], axis=0)
    ensemble = probabilities.argmax(axis=1)
    describe_run(
        f"ensemble (mean probability of {len(loaded)} runs)", labels, ensemble, names, focus, args.top
    )
    result = paired_comparison(predicted[0] == labels, ensemble == labels)
    print(
        f"   against {args.runs[0]}: fixed {result.fixed}, broke {result.broken}; exact McNemar p = "
        f"{result.p_value:.3g}"
    )


if __name__ == "__main__":
    main()
