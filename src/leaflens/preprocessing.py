"""The model's eval preprocessing as data (``preprocess.json``) and its numpy/OpenCV implementation.

The spec is derived from timm's resolved data config, never typed in. Training's Albumentations eval pipeline
(``leaflens.data.transforms``) and the serving engine both build from this spec, so validation in training and
inference in production see the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

# timm interpolation names -> OpenCV flags (Albumentations uses the same flags).
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def spec_from_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``timm.data.resolve_data_config`` output into the JSON-able spec stored in ``preprocess.json``."""
    channels, height, width = (int(v) for v in data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct", 1.0))
    # timm's eval transform: resize the shorter side to floor(size / crop_pct), then centre-crop to size.
    resize_to = math.floor(min(height, width) / crop_pct)
    interpolation = str(data_config.get("interpolation", "bilinear"))
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"unsupported interpolation {interpolation!r}; expected one of {sorted(INTERPOLATIONS)}"
        )
    return {
        "input_size": [channels, height, width],
        "resize_to": resize_to,
        "crop_pct": crop_pct,
        "crop_mode": str(data_config.get("crop_mode", "center")),
        "interpolation": interpolation,
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
    }


def resize_shorter_side(rgb: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resize so the shorter side is ``size`` (aspect kept), as ``A.SmallestMaxSize`` does."""
    height, width = rgb.shape[:2]
    if min(height, width) == size:
        return rgb
    scale = size / min(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return cv2.resize(rgb, (new_w, new_h), interpolation=INTERPOLATIONS[interpolation])


def center_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the centre ``height x width`` window (as ``A.CenterCrop``); the image must be at least that large."""
    top = max(0, (rgb.shape[0] - height) // 2)
    left = max(0, (rgb.shape[1] - width) // 2)
    return rgb[top : top + height, left : left + width]


def preprocess(rgb: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 RGB image -> the model's ``(3, h, w)`` float32 input."""
    _, height, width = spec["input_size"]
    resized = resize_shorter_side(rgb, max(int(spec["resize_to"]), height, width), spec["interpolation"])
    cropped = center_crop(resized, height, width)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1) * 255.0
    scale = 1.0 / (np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1) * 255.0)
    # Transpose while still uint8 (1 byte per value), then normalise in place: ~10x faster than transposing
    # the float image, and equal to (x - mean) / std up to float32 rounding.
    chw = np.ascontiguousarray(cropped.transpose(2, 0, 1)).astype(np.float32)
    chw -= mean
    chw *= scale
    return chw


def preprocess_batch(images: list[np.ndarray], spec: Mapping[str, Any]) -> np.ndarray:
    """Several RGB images -> an ``(N, 3, h, w)`` float32 batch."""
    return np.stack([preprocess(image, spec) for image in images]).astype(np.float32, copy=False)
