"""Compare the fine-tuning strategies on a prepared dataset and write ``reports/peft_comparison.md``.

    python scripts/peft_comparison.py --processed <prepared plantvillage-mini> [--epochs N] [key=value ...]

Each row is one real ``leaflens.train.run.train`` call with ``experiment=peft_<strategy>`` (offline
MobileNetV3-Small, the same recipe except the strategy) plus the recommended ``experiment=plantvillage_mini``.
Validation picks the best epoch; the *test* split (leaf-disjoint from train and val) is then scored once with
the reloaded best checkpoint, so the test column is not tuned on. The strategy rows train on train only; the
recipe refits on train + val (``data.train_splits``), so its val columns are not held out and are bracketed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from leaflens.malloc import reexec_with_malloc_env

reexec_with_malloc_env()

import torch  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score  # noqa: E402

from leaflens.config import load_config  # noqa: E402
from leaflens.data.datamodule import PlantVillageDataModule  # noqa: E402
from leaflens.export.onnx import LogitsAndEmbedding  # noqa: E402
from leaflens.train.checkpoint import load_run  # noqa: E402
from leaflens.train.run import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ["plantvillage_mini", "peft_lora", "peft_bitfit", "peft_head", "peft_last_k", "peft_full"]


def score_test(run_dir: Path, processed: Path) -> dict[str, float]:
    """Top-1 and macro-F1 of the run's best checkpoint on the test split (with its test-time flips, if any), and
    the input size it was scored at."""
    run = load_run(run_dir)
    model = LogitsAndEmbedding(run.model, run.test_time_flips).eval()
    dm = PlantVillageDataModule(processed, run.data_config, batch_size=64, num_workers=0)
    dm.setup("test")
    acc = MulticlassAccuracy(len(run.classes), average="micro")
    f1 = MulticlassF1Score(len(run.classes), average="macro")
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            logits, _ = model(dm.normalize(images))
            acc.update(logits, labels)
            f1.update(logits, labels)
    return {
        "test_acc": float(acc.compute()),
        "test_f1": float(f1.compute()),
        "test_images": len(dm.datasets["test"]),
        "input_px": run.data_config["input_size"][-1],
    }


def _val_cell(row: dict, key: str) -> str:
    """A validation score, in brackets when the row trained on the validation split."""
    value = f"{100 * row[key]:.2f}"
    return f"[{value}]" if "val" in row.get("train_splits", ["train"]) else value


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    """The markdown table of every finished row."""
    columns = [
        ("experiment", lambda r: f"`{r['experiment']}`"),
        ("strategy", lambda r: r["strategy"]),
        ("trainable", lambda r: f"{r['trainable']:,}"),
        ("trainable %", lambda r: f"{r['percent']:.2f}"),
        ("trains on", lambda r: "+".join(r.get("train_splits", ["train"]))),
        ("epochs", lambda r: str(r["epochs"])),
        ("input px", lambda r: str(r.get("input_px", "?"))),
        ("lr", lambda r: f"{r['lr']:g}" if "lr" in r else "?"),
        ("val top-1", lambda r: _val_cell(r, "val_acc")),
        ("val macro-F1", lambda r: _val_cell(r, "val_f1")),
        ("test top-1", lambda r: f"{100 * r['test_acc']:.2f}"),
        ("test macro-F1", lambda r: f"{100 * r['test_f1']:.2f}"),
        ("wall time (s)", lambda r: f"{r['wall_s']:.0f}"),
        ("train img/s", lambda r: str(r["train_img_per_s"])),
        ("load before/after", lambda r: "/".join(str(v) for v in r["load"]) if "load" in r else "?"),
    ]
    table = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|---|---|" + "---:|" * (len(columns) - 2),
        *("| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows),
    ]
    command = ["python scripts/peft_comparison.py --processed <prepared plantvillage-mini>"]
    if args.epochs:
        command.append(f"--epochs {args.epochs}")
    epochs_note = (
        f" `--epochs {args.epochs}` sets the strategy rows' length; the recipe row keeps its own."
        if args.epochs
        else ""
    )
    test_images = rows[0]["test_images"] if rows else "?"
    # Rows written before "total" was recorded leave it out of the sentence rather than guess it.
    total = rows[0].get("total") if rows else None
    total_text = f"the {total:,} parameters" if isinstance(total, int) else "the parameters"
    report = "\n".join(
        [
            "# PEFT comparison on plantvillage-mini",
            "",
            f"Produced by `{' '.join(command + args.overrides)}`.{epochs_note}",
            "",
            "Data: `../shared/data/plantvillage-mini` (3,202 real images, 34 classes) prepared by "
            "`leaflens data prepare`: exact and near-duplicate images and photo series of one leaf are "
            f"grouped and groups split {args.split_label}, so test leaves never appear in training "
            f"(test = {test_images} images). The strategy rows train on train only, so their val is held out too; "
            "the recipe refits on train + val (`data.train_splits`), so its val columns [in brackets] are not. "
            "Every row uses this split; run alone, the recipe prepares its own 80/15/5 split and refits on 95 % "
            "of the images (`configs/experiment/plantvillage_mini.yaml`).",
            "Model: offline MobileNetV3-Small (`tf_mobilenetv3_small_100`, folded BN kept in eval mode), "
            "38-way classifier. Every row uses the same recipe as `experiment=plantvillage_mini` "
            "(AdamW + warm-up/cosine, label smoothing 0.1, EMA of the weights, same augmentation) except the "
            "strategy and, where many weights train, a lower peak learning rate. "
            f"Trainable % is relative to {total_text} of the exported (merged) model. Validation "
            "chooses the best epoch; test is scored once, on the reloaded best checkpoint.",
            "",
            *table,
            "",
            f"Wall time and img/s come from a {os.cpu_count()}-core machine; the last column is its load "
            "average before and after each row (above the core count means other jobs competed).",
            "",
        ]
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, required=True, help="prepared data.processed_dir")
    parser.add_argument("--out", type=Path, default=Path("outputs/peft_comparison"), help="run directories")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="trainer.max_epochs of the strategy rows (the recipe keeps its own)",
    )
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "peft_comparison.md")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = parser.parse_args()
    if misplaced := [name for name in args.experiments if "=" in name]:
        parser.error(f"config overrides go before --experiments (they were read as experiments): {misplaced}")

    # Every row trains and is tested on this one prepared split, also the recipe, whose experiment prepares its
    # own 80/15/5 split when it runs alone: the split overrides keep each row's recorded config true to it.
    fractions = json.loads((args.processed / "stats.json").read_text())["split_fractions"]
    extra = [
        *args.overrides,
        f"data.processed_dir={args.processed}",
        f"data.split.val={fractions['val']}",
        f"data.split.test={fractions['test']}",
        "trainer.enable_progress_bar=false",
    ]
    args.split_label = "/".join(
        f"{100 * share:.0f}"
        for share in (1 - fractions["val"] - fractions["test"], fractions["val"], fractions["test"])
    )
    rows = []
    for name in args.experiments:
        run_dir = args.out / name
        summary = run_dir / "summary.json"
        if summary.is_file():  # resumable: a finished row is not trained again
            rows.append(json.loads(summary.read_text()))
            continue
        # The recipe is reported as it ships; --epochs shortens the strategy rows only.
        epochs = [f"trainer.max_epochs={args.epochs}"] if args.epochs and name != "plantvillage_mini" else []
        cfg = load_config(
            [f"experiment={name}", *extra, *epochs, f"paths.output_dir={run_dir}"], task_name="train"
        )
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
        metrics = json.loads((run_dir / "metrics.json").read_text())
        trainable = json.loads((run_dir / "trainable.json").read_text())
        row = {
            "experiment": name,
            "strategy": trainable["strategy"],
            "epochs": cfg.trainer.max_epochs,
            "train_splits": list(cfg.data.train_splits),
            "trainable": trainable["trainable"],
            "total": trainable["total"],
            "percent": trainable["percent"],
            "val_acc": metrics["val_acc"],
            "val_f1": metrics["val_f1"],
            "best_epoch": metrics["best_epoch"],
            "wall_s": round(wall, 1),
            "train_img_per_s": metrics["train_img_per_s"],
            "lr": cfg.optim.optimizer.lr,
            "load": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            **score_test(run_dir, args.processed),
        }
        summary.write_text(json.dumps(row, indent=2))
        rows.append(row)
        print(json.dumps(row))
        write_report(rows, args)
    write_report(rows, args)
    print(args.report.read_text())


if __name__ == "__main__":
    main()
