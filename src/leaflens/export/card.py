"""MODEL_CARD.md: what the model is, what it was trained and tested on, how good it is, and where it fails."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from leaflens.evaluate.report import SPLIT_NAMES


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f} %" if isinstance(value, int | float) else "n/a"


def _num(value: Any, fmt: str = ".3f") -> str:
    return format(float(value), fmt) if isinstance(value, int | float) else "n/a"


def model_card(
    info: Mapping[str, Any],
    classes: Sequence[Mapping[str, Any]],
    split_counts: Mapping[str, int],
    trainable: Mapping[str, Any],
    metrics: Mapping[str, Any],
    calibration: Mapping[str, Any],
    parity: Mapping[str, Any],
    quantization: Mapping[str, Any] | None = None,
) -> str:
    """Render the model card as markdown from the package's own JSON parts (nothing is typed in twice)."""
    present = [c for c in classes if int(c.get("count", 0)) > 0]
    missing = [c["display_name"] for c in classes if int(c.get("count", 0)) == 0]
    test = metrics.get("test") or {}
    val = metrics.get("validation") or {}
    abstain = calibration.get("abstain", {})
    calib_fit = calibration.get("fit", {})
    fit_name = SPLIT_NAMES.get(calibration.get("fitted_on", "val"), "validation")
    val_trained = "val" in calibration.get("trained_on", ["train"])
    lines = [
        f"# Model card: leaflens {info.get('arch')} ({info.get('strategy')})",
        "",
        "Diagnoses plant diseases from a photo of a single leaf: returns the crop, the disease (or "
        "healthy), a "
        'calibrated probability and "not sure" when it should not be trusted.',
        "",
        "## Model",
        f"- Architecture: `{info.get('arch')}` (timm, ImageNet-pretrained), {info.get('num_classes')} "
        "outputs, "
        f"input {info.get('input_size')}.",
        f"- Fine-tuning strategy: **{trainable.get('strategy', info.get('strategy'))}**, trainable "
        "parameters "
        f"{trainable.get('trainable', 'n/a'):,} of {trainable.get('total', 'n/a'):,} "
        f"({_num(trainable.get('percent'), '.2f')} %)."
        if isinstance(trainable.get("trainable"), int) and isinstance(trainable.get("total"), int)
        else f"- Fine-tuning strategy: **{trainable.get('strategy', info.get('strategy'))}**.",
        f"- Exported to ONNX (opset {info.get('opset')}); ONNX Runtime vs PyTorch on {parity.get('images')} "
        f"validation images: max |logit diff| {_num(parity.get('max_abs_logit_diff'), '.1e')}, top-1 "
        "agreement "
        f"{_pct(parity.get('top1_agreement'))}.",
        "- Test-time flips: the graph averages the logits of the four flips of each photo (4x the compute of "
        "one view)."
        if info.get("test_time_flips")
        else "- Test-time flips: off (one view per photo).",
        *(
            [
                f"- Output stride {info['output_stride']}: the last stages run dilated at stride 1 (a finer final "
                "feature map from the same weights, for more compute)."
            ]
            if info.get("output_stride", 32) != 32
            else []
        ),
        *(
            [
                f"- Cosine classifier: logits are {_num(info.get('cosine_scale'), 'g')} x the cosine between the "
                "photo's L2-normalised features and each class's L2-normalised weights (no bias)."
            ]
            if info.get("classifier") == "cosine"
            else []
        ),
        "",
        "## Data and split",
        f"- PlantVillage (lab photos of single detached leaves on a plain background), "
        f"{len(present)} of {len(classes)} classes present.",
        "- Split by leaf group (copies and near-duplicates of one leaf never straddle splits): "
        + ", ".join(f"{k} {v}" for k, v in split_counts.items())
        + " images.",
        "",
        "## Metrics",
        "| set | images | top-1 | top-5 | macro-F1 | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for name, block in (("validation (trained on)" if val_trained else "validation", val), ("test", test)):
        if block:
            lines.append(
                f"| {name} | {block.get('images', 'n/a')} | {_pct(block.get('top1'))} | "
                f"{_pct(block.get('top5'))} | "
                f"{_num(block.get('macro_f1'))} | {_num(block.get('ece'))} |"
            )
    if not (val or test):
        lines.append("| (not evaluated: run `leaflens evaluate run=<dir>` before export) | | | | | |")
    lines += [
        "",
        '## Calibration and "not sure"',
        f"- Temperature scaling fitted on {fit_name}: T = {_num(calibration.get('temperature'))}; ECE "
        f"{_num(calib_fit.get('ece_before'))} -> {_num(calib_fit.get('ece_after'))}, NLL "
        f"{_num(calib_fit.get('nll_before'))} -> {_num(calib_fit.get('nll_after'))}.",
        f'- Abstains ("not sure") when the calibrated top probability is below '
        f"{_num(abstain.get('threshold'))}, chosen so at most "
        f"{_pct(abstain.get('max_false_abstain_rate'))} of "
        f"correct {fit_name} answers abstain (measured: {_pct(calib_fit.get('false_abstain_rate'))}).",
        *(
            [
                "- The model also trained on the validation split (a final refit), so calibration was fitted on "
                "test: test accuracy is held out, test calibration and abstain figures are in-sample."
            ]
            if val_trained
            else []
        ),
    ]
    ood = calibration.get("non_leaf") or metrics.get("non_leaf")
    if ood:
        lines.append(
            f"- On {ood.get('images')} non-leaf natural images (scikit-image samples) it abstains on "
            f"{_pct(ood.get('abstain_rate'))} of them."
        )
    if quantization:
        lines += [
            "",
            "## int8 model",
            "- Static QDQ int8 calibrated on training images: accuracy "
            f"{_pct(quantization.get('accuracy_fp32'))} "
            f"-> {_pct(quantization.get('accuracy_int8'))} (drop "
            f"{_num(quantization.get('accuracy_drop_points'), '.2f')}"
            f" pt, limit {quantization.get('max_accuracy_drop_points')}), speed-up x"
            f"{_num(quantization.get('speedup'), '.2f')} at batch 32 on the export machine; "
            f"{'shipped' if quantization.get('accepted') else 'refused'}.",
        ]
    lines += [
        "",
        "## Intended use",
        "- Decision support for growers, advisers and students: a first guess at what ails a leaf of "
        "one of the "
        "listed crops, to be confirmed by a person. Not a replacement for an agronomist or a lab test.",
        "",
        "## Limits",
        "- **Lab photos vs field photos.** PlantVillage images are single leaves on a uniform "
        "background under "
        "controlled light. Field photos (several leaves, soil, hands, shadows, blur, other growth "
        "stages) are "
        'out of distribution; expect clearly lower accuracy there, and more "not sure" answers.',
        "- **Only the listed crops and diseases.** A disease or crop outside the list is always mapped "
        "to one of "
        'the known classes (or "not sure"); the model cannot say "something else" with certainty.',
        "- A photo that is not a leaf may still get a confident answer; the abstain rule reduces but "
        "does not "
        "remove this.",
    ]
    if missing:
        lines.append(
            f"- **Missing classes:** {len(missing)} declared class(es) had no images and were never learned: "
            + ", ".join(missing)
            + "."
        )
    lines.append("")
    return "\n".join(lines)
