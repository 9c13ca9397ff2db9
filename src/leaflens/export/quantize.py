"""Optional static int8 (QDQ) quantization with ONNX Runtime, calibrated on training images, with a gate.

Int8 is only shipped when its accuracy drop stays within ``export.int8_max_accuracy_drop`` points; the
measured speed-up is reported as it is (on CPUs without VNNI-friendly kernels it can be < 1).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from leaflens.logs import logger
from leaflens.serving.engine import INPUT_NAME, OUTPUT_NAMES, make_session


class Int8RefusedError(RuntimeError):
    """The int8 model lost more accuracy than allowed."""


class _BatchReader(CalibrationDataReader):
    """Feeds preprocessed calibration images to the ONNX Runtime calibrator, a few at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self._chunks = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT_NAME: chunk}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> Path:
    """Write a static QDQ int8 model (per-channel int8 weights, int8 activations) calibrated on
    ``calibration``."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph optimisation first, as ONNX Runtime recommends before static quantization.
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except TypeError as error:
            # ONNX Runtime's symbolic shape inference (meant for transformers' dynamic shapes) gives up on some
            # graphs, e.g. the cosine classifier's L2 normalisation; ONNX's own shape inference covers a CNN.
            logger.warning(
                "Symbolic shape inference failed ({}); quantizing with ONNX shape inference only", error
            )
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            _BatchReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    logger.info("Wrote int8 model {} ({:.1f} MB)", int8_path, int8_path.stat().st_size / 1e6)
    return int8_path


def images_per_second(session: Any, batch: np.ndarray, repeats: int = 3) -> float:
    """Best-of-``repeats`` throughput of ``session`` on ``batch`` (one warm-up run first)."""
    session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def compare_int8(
    fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray, threads: int | None = None
) -> dict[str, Any]:
    """Accuracy of both models on labelled ``images`` and their batch-32 throughput, measured in one run."""
    fp32, int8 = make_session(fp32_path, threads), make_session(int8_path, threads)
    fp32_logits = fp32.run(["logits"], {INPUT_NAME: images})[0]
    int8_logits = int8.run(["logits"], {INPUT_NAME: images})[0]
    acc_fp32 = float((fp32_logits.argmax(1) == labels).mean())
    acc_int8 = float((int8_logits.argmax(1) == labels).mean())
    bench = images[:32]
    speed_fp32, speed_int8 = images_per_second(fp32, bench), images_per_second(int8, bench)
    return {
        "images": len(images),
        "accuracy_fp32": acc_fp32,
        "accuracy_int8": acc_int8,
        "accuracy_drop_points": 100.0 * (acc_fp32 - acc_int8),
        "top1_agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
        "fp32_images_per_s_bs32": speed_fp32,
        "int8_images_per_s_bs32": speed_int8,
        "speedup": speed_int8 / speed_fp32,
        "size_mb_fp32": fp32_path.stat().st_size / 1e6,
        "size_mb_int8": int8_path.stat().st_size / 1e6,
    }


def gate_int8(report: dict[str, Any], max_drop_points: float) -> dict[str, Any]:
    """Mark the report accepted or raise :class:`Int8RefusedError` if the accuracy drop is too large."""
    report = {**report, "max_accuracy_drop_points": float(max_drop_points)}
    report["accepted"] = bool(report["accuracy_drop_points"] <= max_drop_points)
    logger.info(
        "int8: accuracy {:.2%} -> {:.2%} (drop {:.2f} pt, limit {}), speed-up x{:.2f}",
        report["accuracy_fp32"],
        report["accuracy_int8"],
        report["accuracy_drop_points"],
        max_drop_points,
        report["speedup"],
    )
    if not report["accepted"]:
        raise Int8RefusedError(
            f"int8 model refused: accuracy drop {report['accuracy_drop_points']:.2f} points exceeds "
            f"export.int8_max_accuracy_drop={max_drop_points}"
        )
    return report
