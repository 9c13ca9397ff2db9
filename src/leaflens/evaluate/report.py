"""``report.md``: one readable page linking every figure and number of an evaluation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

CAPTIONS = {
    "confusion_matrix": "Confusion matrix (row-normalised)",
    "per_class_f1": "Per-class F1",
    "reliability": "Reliability diagram, before and after temperature scaling",
    "worst_mistakes": "Worst mistakes (most confident wrong answers)",
    "gradcam_correct": "Grad-CAM: correct predictions",
    "gradcam_wrong": "Grad-CAM: wrong predictions",
    "training_curves": "Training curves",
    "augmentations": "Augmented training samples",
}


# How a split is named in prose.
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def write_report(
    out: Path, result: Mapping[str, Any], figures: Mapping[str, Path], run_cfg: DictConfig | None
) -> Path:
    """Write ``out/report.md`` (links are relative, so the folder can be moved or published as is)."""
    test, val, cal = result["test"], result["validation"], result["calibration"]
    cal_fit, abstain = cal["fit"], test["abstain"]
    fit_name = SPLIT_NAMES.get(cal.get("fitted_on", "val"), "validation")
    val_trained = "val" in cal.get("trained_on", ["train"])
    val_name = "validation (trained on)" if val_trained else "validation"
    model = run_cfg.get("model", {}).get("name") if run_cfg is not None else None
    strategy = run_cfg.get("peft", {}).get("strategy") if run_cfg is not None else None
    lines = [
        "# leaflens evaluation report",
        "",
        f"- Run: `{result['run']}` (model `{model}`, strategy `{strategy}`)",
        f"- Evaluated on: {result['evaluated_on']}, {test['images']} images, {test['classes_present']} "
        "classes present",
        "- Numbers: [`metrics.json`](metrics.json)",
    ]
    if result["unknown_folders"]:
        lines.append(
            "- **Class folders not in the model's classes (not evaluated):** "
            f"{', '.join(result['unknown_folders'])}"
        )
    if result["unreadable"]:
        lines.append(f"- **Unreadable files skipped:** {len(result['unreadable'])} (listed in metrics.json)")
    lines += [
        "",
        "## Summary",
        "| set | images | top-1 | top-5 | macro-F1 | ECE |",
        "|---|---|---|---|---|---|",
        f"| {val_name} | {val['images']} | {_pct(val['top1'])} | {_pct(val['top5'])} | "
        f"{val['macro_f1']:.3f} | {val['ece']:.3f} |",
        f"| {result['evaluated_on']} | {test['images']} | {_pct(test['top1'])} | {_pct(test['top5'])} | "
        f"{test['macro_f1']:.3f} | {test['ece']:.3f} |",
        "",
        '## Calibration and "not sure"',
        f"- Temperature T = {cal['temperature']:.3f}, fitted on {cal_fit['images']} {fit_name} images "
        f"(NLL {cal_fit['nll_before']:.3f} -> {cal_fit['nll_after']:.3f}).",
        f"- ECE on {fit_name} {cal_fit['ece_before']:.3f} -> {cal_fit['ece_after']:.3f}; on the "
        "evaluated set "
        f"{test['ece_uncalibrated']:.3f} -> {test['ece']:.3f}.",
        f'- Abstain rule: "not sure" when the calibrated top probability < {cal["abstain"]["threshold"]:.3f} '
        f"(chosen on {fit_name} for a false-abstain rate <= "
        f"{_pct(cal['abstain']['max_false_abstain_rate'])}).",
        *(
            [
                f"- The run also trained on validation (`data.train_splits`), so calibration was fitted on "
                f"{fit_name}: the ECE and abstain figures of that set are in-sample; its top-1, top-5 and "
                "macro-F1 are not (temperature never changes the predicted class)."
            ]
            if val_trained
            else []
        ),
        "",
        "| data | abstain rate | false-abstain rate (correct answers withheld) | wrong answers caught | "
        "accuracy when answering |",
        "|---|---|---|---|---|",
        f"| {fit_name} leaves (calibration set) | {_pct(cal_fit['abstain_rate'])} | "
        f"{_pct(cal_fit['false_abstain_rate'])} | "
        f"{_pct(cal_fit['wrong_caught_rate'])} | {_pct(cal_fit['answered_accuracy'])} |",
        f"| {result['evaluated_on']} | {_pct(abstain['abstain_rate'])} | "
        f"{_pct(abstain['false_abstain_rate'])} | "
        f"{_pct(abstain['wrong_caught_rate'])} | {_pct(abstain['answered_accuracy'])} |",
        f"| non-leaf natural images (scikit-image, {result['non_leaf']['images']}) | "
        f"{_pct(result['non_leaf']['abstain_rate'])} | | | |",
        f"| blurred validation leaves (Gaussian σ=6, {result['blurred_validation']['images']}) | "
        f"{_pct(result['blurred_validation']['abstain_rate'])} | | | |",
        "",
        "Non-leaf images, one by one:",
        "",
        "| image | prediction | confidence | not sure |",
        "|---|---|---|---|",
    ]
    for name, row in result["non_leaf"]["per_image"].items():
        lines.append(
            f"| {name} | {row['prediction']} | {_pct(row['confidence'])} | "
            f"{'yes' if row['not_sure'] else 'no'} |"
        )
    lines += [
        "",
        "## Most confused pairs",
        "",
        "| true | predicted | count | share of true class |",
        "|---|---|---|---|",
    ]
    for pair in test["most_confused"]:
        lines.append(
            f"| {pair['true']} | {pair['predicted']} | {pair['count']} | {_pct(pair['share_of_true'])} |"
        )
    lines += [
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for row in test["per_class"]:
        if row["support"] or row["precision"]:
            lines.append(
                f"| {row['name']} | {row['precision']:.2f} | {row['recall']:.2f} | {row['f1']:.2f} | "
                f"{row['support']} |"
            )
    absent = [row["name"] for row in test["per_class"] if not row["support"]]
    if absent:
        lines.append(f"\nNo evaluation images for: {', '.join(absent)}.")
    lines += ["", "## Figures", ""]
    for key, path in figures.items():
        rel = os.path.relpath(path, out)
        lines += [f"### {CAPTIONS.get(key, key)}", "", f"![{CAPTIONS.get(key, key)}]({rel})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
