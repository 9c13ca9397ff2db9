"""``leaflens evaluate run=<dir>``: calibrate on validation, evaluate on the test split (or a labelled
folder), draw the figures and write ``report.md`` + ``metrics.json`` to ``paths.output_dir``.

Scoring goes through the same :class:`~leaflens.serving.engine.InferenceEngine` as ``predict`` and the API
(preprocessing from the model's spec, softmax(logits / T), abstain rule), with the run's PyTorch model as
backend. Side effect: ``calibration.json`` and ``evaluation.json`` are written into the run directory for
``export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from leaflens.evaluate import figures
from leaflens.evaluate.calibration import abstain_summary, calibrate, calibration_split
from leaflens.evaluate.metrics import classification_metrics, expected_calibration_error, reliability_bins
from leaflens.evaluate.ood import blurred, non_leaf_images
from leaflens.evaluate.report import write_report
from leaflens.evaluate.scoring import score_paths
from leaflens.explain import cropped_view, gradcam_overlays
from leaflens.images import decode_image
from leaflens.logs import logger
from leaflens.serving.engine import InferenceEngine, softmax


def _json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _same_path(a: Any, b: Any) -> bool:
    return (
        a is not None
        and b is not None
        and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    )


def folder_eval_set(
    root: Path, classes: list[dict[str, Any]], variant: str
) -> tuple[pd.DataFrame, list[str]]:
    """Labelled class folders under ``root`` mapped to class ids by exact name; unknown folder names
    returned."""
    from leaflens.data.scan import list_files, scan_class_folders

    ids = {c["name"]: int(c["id"]) for c in classes}
    rows, unknown = [], []
    for folder, name in scan_class_folders(root, variant):
        if name not in ids:
            unknown.append(name)
            continue
        rows += [{"path": str(p), "label": name, "label_id": ids[name]} for p in list_files(folder)]
    if unknown:
        logger.warning(
            "{} class folder(s) not in the model's classes.json, not evaluated: {}", len(unknown), unknown
        )
    if not rows:
        raise ValueError(f"no images of the model's classes under {root} (unknown folders: {unknown})")
    return pd.DataFrame(rows), sorted(set(unknown))


def evaluation_set(
    cfg: DictConfig, run_cfg: DictConfig, manifest: pd.DataFrame, classes: list
) -> tuple[pd.DataFrame, str, list[str]]:
    """The run's test split, or the folder of ``data.source`` when it is not the data the run was trained
    on."""
    source = cfg.data.get("source")
    trained_on = run_cfg.get("data", {}).get("source") if run_cfg is not None else None
    if source and not _same_path(source, trained_on) and Path(str(source)).is_dir():
        logger.info("Evaluating on the labelled folder {} (the run was trained on {})", source, trained_on)
        frame, unknown = folder_eval_set(Path(str(source)), classes, str(cfg.data.variant))
        return frame, f"folder {source}", unknown
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError(
            "the run's prepared data has no test split; evaluate a labelled folder with data.source="
        )
    return test, "test split", []


def _abstain_on(engine: InferenceEngine, images: dict[str, np.ndarray]) -> dict[str, Any]:
    predictions = engine.predict_arrays(list(images.values()))
    return {
        "images": len(predictions),
        "abstain_rate": float(np.mean([p.abstain for p in predictions])),
        "per_image": {
            name: {"prediction": p.best.name, "confidence": p.confidence, "not_sure": p.abstain}
            for name, p in zip(images, predictions, strict=True)
        },
    }


def _augmented_grid(run_cfg: DictConfig, data_config: dict, spec: dict, paths: list[str], path: Path) -> Path:
    """A few training images, each as the model sees it in evaluation and in three random augmentations."""
    from leaflens.data.transforms import train_transform

    augment = run_cfg.get("data", {}).get("augment")
    transform = train_transform(data_config, dict(augment) if augment is not None else None, normalize=False)
    tiles, titles = [], []
    for p in paths:
        rgb = decode_image(p)
        tiles.append(cropped_view(rgb, spec))
        titles.append(f"{Path(p).parent.name[:28]}\n(eval view)")
        for k in range(3):
            tiles.append(transform(image=rgb)["image"])
            titles.append(f"augmented #{k + 1}")
    return figures.image_grid_figure(tiles, titles, path, "Training augmentations (data.augment)", ncols=4)


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate ``cfg.run``; return the report directory (``cfg.paths.output_dir``)."""
    from leaflens.data.prepare import load_manifest
    from leaflens.export.onnx import TorchRunner
    from leaflens.export.run import DEFAULT_CALIBRATION, run_package, run_processed_dir
    from leaflens.train.checkpoint import load_run

    if not cfg.run:
        raise ValueError("evaluate needs a training run: leaflens evaluate run=<run dir>")
    run_dir = Path(cfg.run).expanduser().resolve()
    out = Path(cfg.paths.output_dir).expanduser().resolve()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.evaluate
    bins, batch = int(ev.calibration_bins), int(ev.batch_size)

    loaded = load_run(run_dir)
    classes = list(loaded.classes)
    names = [c["display_name"] for c in classes]
    manifest = load_manifest(run_processed_dir(run_dir, cfg))
    engine = InferenceEngine(
        run_package(run_dir, loaded, DEFAULT_CALIBRATION),
        TorchRunner(loaded.model, batch, loaded.test_time_flips),
    )

    # 1. Calibration and abstain rule on held-out images (validation, or test after a train + val refit).
    trained_on = loaded.train_splits
    fit_split = calibration_split(trained_on)
    fit = manifest[manifest["split"] == fit_split].reset_index(drop=True)
    fit_scores = score_paths(engine, list(fit["path"]), batch, desc=f"calibration ({fit_split})")
    calibration = calibrate(
        fit_scores.logits,
        fit["label_id"].to_numpy()[fit_scores.index],
        len(classes),
        float(ev.max_false_abstain_rate),
        bins,
    )
    calibration["fitted_on"] = fit_split
    calibration["trained_on"] = trained_on
    engine = engine.with_calibration(calibration)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    val_scores = (
        fit_scores if fit_split == "val" else score_paths(engine, list(val["path"]), batch, "validation")
    )
    val_labels = val["label_id"].to_numpy()[val_scores.index]
    val_probs = engine.calibrated_probs(val_scores.logits)
    val_metrics = classification_metrics(val_probs, val_labels, names, bins)
    non_leaf = _abstain_on(engine, non_leaf_images())
    val_images = [decode_image(p) for p in val["path"].iloc[val_scores.index][:64]]
    blur = _abstain_on(engine, {f"val-{i}": im for i, im in enumerate(blurred(val_images))})
    calibration["non_leaf"] = {k: v for k, v in non_leaf.items() if k != "per_image"}
    calibration["blurred_validation"] = {k: v for k, v in blur.items() if k != "per_image"}
    _json(run_dir / "calibration.json", calibration)
    logger.info(
        "Calibration on {}: T={:.3f}, ECE {:.3f} -> {:.3f}; abstain threshold {:.3f}; abstains on {:.0%} of "
        "non-leaf images",
        fit_split,
        calibration["temperature"],
        calibration["fit"]["ece_before"],
        calibration["fit"]["ece_after"],
        calibration["abstain"]["threshold"],
        non_leaf["abstain_rate"],
    )

    # 2. Metrics on the evaluation set.
    eval_set, source, unknown = evaluation_set(cfg, loaded.cfg, manifest, classes)
    scores = score_paths(engine, list(eval_set["path"]), batch, desc="evaluate")
    labels = eval_set["label_id"].to_numpy()[scores.index]
    probs = engine.calibrated_probs(scores.logits)
    metrics = classification_metrics(probs, labels, names, bins)
    uncalibrated = softmax(scores.logits, 1.0)
    metrics["ece_uncalibrated"] = expected_calibration_error(uncalibrated, labels, len(classes), bins)
    confidence, preds = probs.max(axis=1), probs.argmax(axis=1)
    metrics["abstain"] = abstain_summary(confidence, preds == labels, calibration["abstain"]["threshold"])

    # 3. Figures.
    made: dict[str, Path | None] = {
        "confusion_matrix": figures.confusion_matrix_figure(
            np.asarray(metrics["confusion_matrix"]), names, fig_dir / "confusion_matrix.png"
        ),
        "per_class_f1": figures.per_class_f1_figure(
            metrics["per_class"], names, fig_dir / "per_class_f1.png"
        ),
        "reliability": figures.reliability_figure(
            reliability_bins(uncalibrated, labels, bins),
            metrics["reliability"],
            (metrics["ece_uncalibrated"], metrics["ece"]),
            fig_dir / "reliability.png",
        ),
    }
    paths = eval_set["path"].to_numpy()[scores.index]
    wrong = np.flatnonzero(preds != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][: int(ev.worst_mistakes)]
    worst_images = [cropped_view(decode_image(paths[i]), engine.spec) for i in worst]
    made["worst_mistakes"] = figures.image_grid_figure(
        worst_images,
        [f"true: {names[labels[i]]}\npred: {names[preds[i]]} ({confidence[i]:.0%})" for i in worst],
        fig_dir / "worst_mistakes.png",
        f"The {len(worst)} most confident mistakes ({source})",
    )
    rng = np.random.default_rng(int(cfg.seed))
    n_cam = int(ev.gradcam_samples)
    correct = np.flatnonzero(preds == labels)
    for kind, pool in (("correct", correct), ("wrong", wrong)):
        chosen = (
            rng.choice(pool, size=min(n_cam, len(pool)), replace=False) if len(pool) else np.array([], int)
        )
        overlays = gradcam_overlays(
            loaded.model,
            [decode_image(paths[i]) for i in chosen],
            [int(preds[i]) for i in chosen],
            engine.spec,
        )
        made[f"gradcam_{kind}"] = figures.image_grid_figure(
            overlays,
            [f"true: {names[labels[i]]}\npred: {names[preds[i]]} ({confidence[i]:.0%})" for i in chosen],
            fig_dir / f"gradcam_{kind}.png",
            f"Grad-CAM of the predicted class: {kind} predictions",
        )
    made["training_curves"] = figures.training_curves_figure(
        sorted((run_dir / "logs").rglob("metrics.csv")), fig_dir / "training_curves.png"
    )
    train_paths = list(
        manifest[manifest["split"] == "train"]["path"].sample(
            n=min(4, int((manifest["split"] == "train").sum())), random_state=int(cfg.seed)
        )
    )
    made["augmentations"] = (
        _augmented_grid(
            loaded.cfg, loaded.data_config, engine.spec, train_paths, fig_dir / "augmentations.png"
        )
        if train_paths
        else None
    )

    # 4. metrics.json, report.md, and the summary export reads.
    summary_keys = ("images", "classes_present", "top1", "top5", "macro_f1", "ece")
    result = {
        "run": str(run_dir),
        "evaluated_on": source,
        "unknown_folders": unknown,
        "unreadable": scores.failed,
        "calibration": calibration,
        "validation": {k: val_metrics[k] for k in summary_keys},
        "test": {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "reliability")},
        "non_leaf": non_leaf,
        "blurred_validation": blur,
        "confusion_matrix": metrics["confusion_matrix"],
        "class_names": [c["name"] for c in classes],
    }
    _json(out / "metrics.json", result)
    _json(
        run_dir / "evaluation.json",
        {
            "report": str(out),
            "evaluated_on": source,
            "validation": result["validation"],
            "test": {
                **{k: metrics[k] for k in summary_keys},
                "abstain": metrics["abstain"],
                "ece_uncalibrated": metrics["ece_uncalibrated"],
            },
            "non_leaf": calibration["non_leaf"],
        },
    )
    report = write_report(out, result, {k: v for k, v in made.items() if v is not None}, loaded.cfg)
    logger.info(
        "top-1 {:.1%}, top-5 {:.1%}, macro-F1 {:.3f}, ECE {:.3f} on {} -> {}",
        metrics["top1"],
        metrics["top5"],
        metrics["macro_f1"],
        metrics["ece"],
        source,
        report,
    )
    return out
