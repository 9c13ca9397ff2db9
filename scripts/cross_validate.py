"""Grouped, stratified k-fold cross-validation of training recipes on a prepared dataset.

One test split of a few hundred images moves by a point with the luck of which leaves it drew. Here every image
of the dataset is scored once, by a model trained without its leaf group: the folds are whole leaf groups
(``leaflens.data.split.group_kfold`` over the manifest's ``group`` column, so copies and re-shoots of a leaf
never straddle train and held-out), stratified by class. Each fold trains the experiment as it is configured
but on the other folds only, keeps its last epoch (nothing is chosen on the held-out fold, which the run still
validates on for its curve), and predicts the held-out fold. Finished folds are kept, so an interrupted run
resumes. ``--train-folds M`` trains each model on only M of the other folds: a point of the learning curve
(every image is still scored once, by a model that saw M/k of the data), to tell what more data would buy.

    python scripts/cross_validate.py --processed <prepared dir> --experiments plantvillage_mini peft_lora \
        --strategy-epochs 8 data.raw_dir=<its raw folder>

Writes ``<out>/data/fold_<k>/`` (the fold's manifest), ``<out>/<experiment>/fold_<k>/`` (run, predictions.csv,
logits.npy in its row order, fold.json), ``<out>/summary.json`` and a markdown table (``--report``, by default
``reports/cross_validation.md``). ``scripts/compare_cv.py`` compares two runs image by image; ``scripts/cv_errors.py``
says where the errors are and what averaging runs' probabilities (an ensemble) would score.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from leaflens.malloc import reexec_with_malloc_env

reexec_with_malloc_env()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from leaflens.config import load_config  # noqa: E402
from leaflens.data.datamodule import PlantVillageDataModule  # noqa: E402
from leaflens.data.split import group_kfold, training_folds  # noqa: E402
from leaflens.export.onnx import LogitsAndEmbedding  # noqa: E402
from leaflens.train.checkpoint import load_run  # noqa: E402
from leaflens.train.run import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = "plantvillage_mini"


def write_fold_data(
    processed: Path,
    manifest: pd.DataFrame,
    fold_ids: list[int],
    fold: int,
    train_folds: list[int],
    out: Path,
) -> Path:
    """A prepared-dataset directory whose ``val`` split is the held-out fold and ``train`` the training folds
    (images of any other fold are left out)."""
    out.mkdir(parents=True, exist_ok=True)
    split_of = {fold: "val", **{f: "train" for f in train_folds}}
    fold_manifest = manifest.assign(split=[split_of.get(f) for f in fold_ids]).dropna(subset=["split"])
    fold_manifest.to_csv(out / "manifest.csv", index=False)
    shutil.copy(processed / "classes.json", out / "classes.json")
    stats = json.loads((processed / "stats.json").read_text())
    # Image paths in the manifest are relative to the raw dir, which stats.json records relative to the
    # prepared dir; an absolute path keeps it valid from the fold's directory.
    stats["raw_dir"] = str((processed / stats["raw_dir"]).resolve())
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return out


def predict_held_out(run_dir: Path, fold_data: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Label and prediction of every held-out image, from the run's kept (last-epoch) checkpoint, as the run
    would serve it (with its test-time flips, if any), and the logits behind the predictions (one row per image,
    in the frame's order)."""
    run = load_run(run_dir)
    model = LogitsAndEmbedding(run.model, run.test_time_flips).eval()
    dm = PlantVillageDataModule(fold_data, run.data_config, batch_size=64, num_workers=0)
    dm.setup("validate")
    batches = []
    with torch.no_grad():
        for images, _ in dm.val_dataloader():
            logits, _ = model(dm.normalize(images))
            batches.append(logits.numpy())
    all_logits = np.concatenate(batches)
    frame = dm.split_frame("val")[["path", "label", "label_id", "group"]].copy()
    frame["predicted_id"] = all_logits.argmax(axis=1)
    return frame, all_logits


def run_fold(
    experiment: str,
    fold: int,
    folds: int,
    train_folds: list[int],
    fold_data: Path,
    fold_dir: Path,
    overrides: list[str],
) -> dict:
    """Train one fold (or reuse a finished one trained on the same folds) and return its row."""
    summary_path = fold_dir / "fold.json"
    if summary_path.is_file():
        row = json.loads(summary_path.read_text())
        # Rows written before --train-folds existed trained on all the other folds.
        done_on = row.get("train_folds", training_folds(fold, folds))
        if done_on != train_folds:
            raise SystemExit(
                f"{fold_dir} was trained on folds {done_on}, not {train_folds}: give this run another --out"
            )
        return row
    run_dir = fold_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted fold starts again
    cfg = load_config(
        [
            f"experiment={experiment}",
            f"data.processed_dir={fold_data}",
            "data.train_splits=[train]",
            # The held-out fold must not choose anything: keep the last epoch, never stop early.
            "callbacks.checkpoint.monitor=null",
            "callbacks.early_stopping=null",
            "trainer.enable_progress_bar=false",
            *overrides,
            f"paths.output_dir={run_dir}",
        ],
        task_name="train",
    )
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    predictions, logits = predict_held_out(run_dir, fold_data)
    predictions.to_csv(fold_dir / "predictions.csv", index=False)
    # Kept for ensembles of runs (scripts/cv_errors.py); ~100 KB per fold.
    np.save(fold_dir / "logits.npy", logits.astype(np.float32))
    trainable = json.loads((run_dir / "trainable.json").read_text())
    row = {
        "experiment": experiment,
        "fold": fold,
        "strategy": trainable["strategy"],
        "percent": trainable["percent"],
        "epochs": cfg.trainer.max_epochs,
        "train_folds": train_folds,
        "train_images": len(pd.read_csv(fold_data / "manifest.csv").query("split == 'train'")),
        "held_out_images": len(predictions),
        "top1": accuracy_score(predictions["label_id"], predictions["predicted_id"]),
        "wall_s": round(wall, 1),
    }
    summary_path.write_text(json.dumps(row, indent=2))
    return row


def summarise(experiment: str, rows: list[dict], exp_dir: Path) -> dict:
    """Pooled scores over every held-out image of an experiment's folds."""
    predictions = pd.concat(pd.read_csv(exp_dir / f"fold_{r['fold']}" / "predictions.csv") for r in rows)
    per_fold = [100 * r["top1"] for r in rows]
    run_cfg = OmegaConf.load(exp_dir / f"fold_{rows[0]['fold']}" / "run" / "config.yaml")
    return {
        "experiment": experiment,
        "strategy": rows[0]["strategy"],
        "percent": rows[0]["percent"],
        "epochs": rows[0]["epochs"],
        "test_time_flips": bool(run_cfg.model.get("test_time_flips", False)),
        "folds": len(rows),
        "images": len(predictions),
        "top1": 100 * accuracy_score(predictions["label_id"], predictions["predicted_id"]),
        "macro_f1": 100 * f1_score(predictions["label_id"], predictions["predicted_id"], average="macro"),
        "fold_top1": per_fold,
        "fold_sd": statistics.stdev(per_fold) if len(per_fold) > 1 else 0.0,
        "train_images": [r["train_images"] for r in rows],
        "wall_s": [r["wall_s"] for r in rows],
    }


def write_report(summaries: list[dict], args: argparse.Namespace) -> None:
    """The markdown table of every finished experiment."""
    lines = [
        "| experiment | strategy | trainable % | epochs | test-time flips | folds | images scored | top-1 "
        "| macro-F1 | top-1 per fold | fold sd | mean wall time per fold (s) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| `{s['experiment']}` | {s['strategy']} | {s['percent']:.2f} | {s['epochs']} "
            f"| {'yes' if s['test_time_flips'] else 'no'} | {s['folds']} "
            f"| {s['images']:,} | {s['top1']:.2f} | {s['macro_f1']:.2f} "
            f"| {' '.join(f'{v:.1f}' for v in s['fold_top1'])} | {s['fold_sd']:.2f} "
            f"| {statistics.mean(s['wall_s']):.0f} |"
        )
    command = " ".join(
        ["python scripts/cross_validate.py --processed <prepared dir>", f"--folds {args.folds}"]
        + ([f"--seed {args.seed}"] if args.seed != 42 else [])
        + ([f"--train-folds {args.train_folds}"] if args.train_folds else [])
        + ([f"--strategy-epochs {args.strategy_epochs}"] if args.strategy_epochs else [])
        + args.overrides
    )
    trained_on = f"{args.train_folds} of the other folds" if args.train_folds else "the other folds"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        "\n".join(
            [
                "# Cross-validation on leaf groups",
                "",
                f"Produced by `{command}` on a {os.cpu_count()}-core machine. Each image is scored once, by the "
                f"last epoch of a model trained on {trained_on} (whole leaf groups, stratified by class); "
                "top-1 and macro-F1 pool all scored images.",
                "",
                *lines,
                "",
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, required=True, help="prepared data.processed_dir")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="fold assignment seed")
    parser.add_argument(
        "--train-folds",
        type=int,
        default=None,
        help="train each model on this many of the other folds (a learning-curve point; default: all of them)",
    )
    parser.add_argument("--experiments", nargs="+", default=[RECIPE])
    parser.add_argument(
        "--strategy-epochs",
        type=int,
        default=None,
        help=f"trainer.max_epochs of every experiment but the recipe ({RECIPE} keeps its own)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/cross_validation"))
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "cross_validation.md")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if misplaced := [name for name in args.experiments if "=" in name]:
        parser.error(f"config overrides go before --experiments (they were read as experiments): {misplaced}")

    manifest = pd.read_csv(args.processed / "manifest.csv", dtype={"group": str, "sha256": str})
    fold_ids = group_kfold(manifest["label"].tolist(), manifest["group"].tolist(), args.folds, args.seed)
    summaries = []
    for experiment in args.experiments:
        exp_dir = args.out / experiment
        epochs = (
            [f"trainer.max_epochs={args.strategy_epochs}"]
            if args.strategy_epochs and experiment != RECIPE
            else []
        )
        rows = []
        for fold in range(args.folds):
            train_folds = training_folds(fold, args.folds, args.train_folds)
            fold_data = write_fold_data(
                args.processed, manifest, fold_ids, fold, train_folds, args.out / "data" / f"fold_{fold}"
            )
            row = run_fold(
                experiment,
                fold,
                args.folds,
                train_folds,
                fold_data,
                exp_dir / f"fold_{fold}",
                [*args.overrides, *epochs],
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
        summaries.append(summarise(experiment, rows, exp_dir))
        (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
        write_report(summaries, args)
    print(args.report.read_text())


if __name__ == "__main__":
    main()
