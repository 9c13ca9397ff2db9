"""Decode any image a user may send into an RGB uint8 array, or fail with a clear reason.

Shared by data preparation, prediction and the API, so a photo is read the same way everywhere:
full decode (truncated files fail here, not deep in a worker), EXIF orientation applied, palette / grayscale /
RGBA / CMYK / 16-bit converted to 8-bit RGB, decompression bombs refused.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own guard raises DecompressionBombError above 2x this many pixels; we refuse above 1x.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _open(source: bytes | str | Path) -> Image.Image:
    if isinstance(source, bytes | bytearray):
        if len(source) == 0:
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
        return Image.open(io.BytesIO(source))
    if Path(source).stat().st_size == 0:
        raise ImageDecodeError("empty", f"{source} is empty (0 bytes)")
    return Image.open(source)


def decode_image(
    source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> np.ndarray:
    """Fully decode ``source`` (bytes or a path) to an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ImageDecodeError: with ``reason`` in {"empty", "not_an_image", "too_large", "corrupt", "too_small"}.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            image.load()  # full decode: a truncated JPEG fails here
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", "not a recognised image format") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", f"image refused as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError("corrupt", f"image could not be decoded: {err}") from err
    rgb = to_rgb(image)
    if min(rgb.shape[:2]) < min_size:
        raise ImageDecodeError(
            "too_small",
            f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is under the minimum side of {min_size}",
        )
    return rgb


def to_rgb(image: Image.Image) -> np.ndarray:
    """Apply EXIF orientation and convert any mode to an ``(H, W, 3)`` uint8 RGB array."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping it.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray((array * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over white, the usual background of a leaf photo, rather than black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
