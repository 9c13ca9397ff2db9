"""Albumentations pipelines built from the model's resolved data config (``timm.data.resolve_data_config``).

Size, interpolation, mean and std always come from ``data_config``; nothing here types them. The eval
pipeline is built from :func:`leaflens.preprocessing.spec_from_data_config`, the same spec the serving engine
uses, so validation in training sees exactly the pixels production sees (tested against
``preprocessing.preprocess``).

Both functions return an ``A.Compose``: call it as ``transform(image=rgb)["image"]`` with an
``(H, W, 3)`` uint8 RGB array to get a ``(3, h, w)`` float32 torch tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from leaflens.preprocessing import INTERPOLATIONS, spec_from_data_config


def _normalise(spec: Mapping[str, Any]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=spec["mean"], std=spec["std"], max_pixel_value=255.0), ToTensorV2()]


def eval_transform(data_config: Mapping[str, Any]) -> A.Compose:
    """Resize the shorter side to ``input / crop_pct``, centre-crop to the input, normalise, to tensor."""
    spec = spec_from_data_config(data_config)
    _, height, width = spec["input_size"]
    return A.Compose(
        [
            A.SmallestMaxSize(
                max_size=max(int(spec["resize_to"]), height, width),
                interpolation=INTERPOLATIONS[spec["interpolation"]],
            ),
            A.CenterCrop(height=height, width=width),
            *_normalise(spec),
        ]
    )


def train_transform(data_config: Mapping[str, Any], augment: Mapping[str, Any] | None) -> A.Compose:
    """Random resized crop, flips, rotation, colour jitter and blur (``data.augment``), then normalise.

    Args:
        data_config: timm's resolved data config of the model.
        augment: The ``data.augment`` settings; ``None`` trains on the eval transform (no augmentation).
    """
    if augment is None:
        return eval_transform(data_config)
    spec = spec_from_data_config(data_config)
    _, height, width = spec["input_size"]
    interpolation = INTERPOLATIONS[spec["interpolation"]]
    return A.Compose(
        [
            # Crop first: every later step then works on the small output image.
            A.RandomResizedCrop(
                size=(height, width),
                scale=tuple(augment["scale"]),
                ratio=tuple(augment["ratio"]),
                interpolation=interpolation,
            ),
            A.HorizontalFlip(p=float(augment["hflip"])),
            A.VerticalFlip(p=float(augment["vflip"])),
            # Leaves have no canonical orientation; reflect the border instead of painting black corners.
            # Bilinear whatever the model's interpolation: this is augmentation, and bicubic costs ~2x here.
            A.Rotate(
                limit=float(augment["rotate_limit"]),
                interpolation=cv2.INTER_LINEAR,
                border_mode=cv2.BORDER_REFLECT_101,
                p=float(augment["rotate_p"]),
            ),
            A.ColorJitter(
                brightness=float(augment["brightness"]),
                contrast=float(augment["contrast"]),
                saturation=float(augment["saturation"]),
                hue=float(augment["hue"]),
                p=float(augment["color_p"]),
            ),
            A.GaussianBlur(blur_limit=(3, 5), p=float(augment["blur_p"])),
            *_normalise(spec),
        ]
    )
