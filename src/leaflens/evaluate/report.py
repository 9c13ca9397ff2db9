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


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def write_report(
    out: Path, result: Mapping[str, Any], figures: Mapping[str, Path], run_cfg: DictConfig | None
) -> Path:
    """Write ``out/report.md`` (links are relative, so the folder can be moved or published as is)."""
    test, val, cal = result["test"], result["validation"], result["calibration"]
    cal_val, abstain = cal["validation"], test["abstain"]
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
        f"| validation | {val['images']} | {_pct(val['top1'])} | {_pct(val['top5'])} | "
        f"{val['macro_f1']:.3f} | {val['ece']:.3f} |",
        f"| {result['evaluated_on']} | {test['images']} | {_pct(test['top1'])} | {_pct(test['top5'])} | "
        f"{test['macro_f1']:.3f} | {test['ece']:.3f} |",
        "",
        '## Calibration and "not sure"',
        f"- Temperature T = {cal['temperature']:.3f}, fitted on {cal_val['images']} validation images "
        f"(NLL {cal_val['nll_before']:.3f} -> {cal_val['nll_after']:.3f}).",
        f"- ECE on validation {cal_val['ece_before']:.3f} -> {cal_val['ece_after']:.3f}; on the "
        "evaluated set "
        f"{test['ece_uncalibrated']:.3f} -> {test['ece']:.3f}.",
        f'- Abstain rule: "not sure" when the calibrated top probability < {cal["abstain"]["threshold"]:.3f} '
        "(chosen on validation for a false-abstain rate <= "
        f"{_pct(cal['abstain']['max_false_abstain_rate'])}).",
        "",
        "| data | abstain rate | false-abstain rate (correct answers withheld) | wrong answers caught | "
        "accuracy when answering |",
        "|---|---|---|---|---|",
        f"| validation leaves | {_pct(cal_val['abstain_rate'])} | {_pct(cal_val['false_abstain_rate'])} | "
        f"{_pct(cal_val['wrong_caught_rate'])} | {_pct(cal_val['answered_accuracy'])} |",
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
