"""Inputs the model should answer "not sure" to: natural non-leaf photos (scikit-image) and blurred leaves."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from leaflens.images import to_rgb
from leaflens.logs import logger

# Natural photos and scans shipped inside scikit-image (no download): people, animals, objects, space, text,
# textures (grass and gravel are the hardest: green / organic but not a leaf).
NON_LEAF_IMAGES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
    "rocket", "text",
)  # fmt: skip


def non_leaf_images(names: Sequence[str] = NON_LEAF_IMAGES) -> dict[str, np.ndarray]:
    """``{name: (H, W, 3) uint8 RGB}`` from ``skimage.data``; images this version lacks are logged and
    skipped."""
    import skimage.data

    images = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            logger.warning("skimage.data has no {!r}; skipped from the non-leaf set", name)
            continue
        array = np.asarray(loader())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        images[name] = to_rgb(Image.fromarray(array))  # grayscale / RGBA -> RGB the way users' files are read
    return images


def blurred(images: Sequence[np.ndarray], sigma: float = 6.0) -> list[np.ndarray]:
    """Strong Gaussian blur: stands in for an out-of-focus phone photo."""
    return [cv2.GaussianBlur(image, (0, 0), sigmaX=sigma) for image in images]
