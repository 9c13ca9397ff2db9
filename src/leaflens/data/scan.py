"""Find ``Crop___Disease`` class folders and validate every file in them.

Each file is read once: its sha256, a full decode (``leaflens.images.decode_image``), its perceptual hash
and per-channel pixel sums (for the train mean/std) all come from that one read. A file that cannot be used
becomes a rejection with a reason, never a silent drop.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from leaflens.images import ImageDecodeError, decode_image
from leaflens.logs import logger

SEPARATOR = "___"
# The three copies PlantVillage ships of every class.
VARIANTS = ("color", "grayscale", "segmented")


@dataclass
class ImageRecord:
    """A usable image: where it is, what it is, and what it looks like."""

    path: Path
    label: str
    sha256: str
    width: int
    height: int
    phash: int  # 64-bit DCT perceptual hash (imagehash.phash) as an unsigned integer
    channel_sum: np.ndarray = field(repr=False)  # float64 (3,), pixel values 0..255
    channel_sumsq: np.ndarray = field(repr=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Rejection:
    """A file (or folder) left out, and why."""

    path: Path
    label: str
    reason: str
    message: str

    def to_dict(self, root: Path | None = None) -> dict[str, str]:
        path = self.path
        if root is not None and path.is_relative_to(root):
            path = path.relative_to(root)
        return {"path": path.as_posix(), "label": self.label, "reason": self.reason, "message": self.message}


def _is_class_name(name: str) -> bool:
    crop, sep, disease = name.partition(SEPARATOR)
    return bool(sep and crop and disease)


def scan_class_folders(root: str | Path, variant: str = "color") -> list[tuple[Path, str]]:
    """All ``Crop___Disease`` folders under ``root`` as ``(folder, class_name)``, sorted by class then path.

    When the dataset ships ``color/``, ``grayscale/`` and ``segmented/`` copies, only folders inside the
    ``variant`` one are kept. A class found in several folders (e.g. ``train/`` and ``valid/``) is listed once
    per folder. Class folders are not searched for nested class folders.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folder under ``root``, or none in ``variant`` when variants are present.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory: run `leaflens data download` first (data.raw_dir)"
        )
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            if _is_class_name(name):
                found.append((Path(dirpath) / name, name))
            else:
                keep.append(name)
        dirnames[:] = keep  # do not descend into class folders
    if not found:
        raise ValueError(f"no Crop___Disease class folders under {root}")
    in_variants = [
        (path, name)
        for path, name in found
        if any(p.lower() in VARIANTS for p in path.relative_to(root).parts)
    ]
    if in_variants:
        chosen = [
            (path, name)
            for path, name in in_variants
            if variant.lower() in (p.lower() for p in path.relative_to(root).parts)
        ]
        if not chosen:
            raise ValueError(f"{root} has {'/'.join(VARIANTS)} copies but no {variant!r} one (data.variant)")
        logger.info("Using the {!r} variant: {} of {} class folders", variant, len(chosen), len(found))
        found = chosen
    return sorted(found, key=lambda item: (item[1], str(item[0])))


def list_files(folder: Path) -> list[Path]:
    """Every regular file under a class folder (any name: non-images are rejected later, not skipped)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def phash_int(rgb: np.ndarray) -> int:
    """The 64-bit perceptual hash of an RGB array as an unsigned integer."""
    bits = imagehash.phash(Image.fromarray(rgb)).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def validate_file(path: Path, label: str, min_size: int, max_pixels: int) -> ImageRecord | Rejection:
    """Read, hash and fully decode one file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return Rejection(path, label, "unreadable", str(err))
    try:
        rgb = decode_image(data, max_pixels=max_pixels, min_size=min_size)
    except ImageDecodeError as err:
        return Rejection(path, label, err.reason, str(err))
    # cv2.meanStdDev runs in C over the whole image; sums are rebuilt from it for pooled statistics.
    mean, std = (v.reshape(3) for v in cv2.meanStdDev(rgb))
    pixels = rgb.shape[0] * rgb.shape[1]
    return ImageRecord(
        path=path,
        label=label,
        sha256=hashlib.sha256(data).hexdigest(),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        phash=phash_int(rgb),
        channel_sum=mean * pixels,
        channel_sumsq=(std**2 + mean**2) * pixels,
    )


def validate_files(
    files: Iterable[tuple[Path, str]], min_size: int, max_pixels: int, workers: int = 2
) -> tuple[list[ImageRecord], list[Rejection]]:
    """Validate ``(path, label)`` pairs, in threads (decoding and hashing release the GIL)."""
    files = list(files)
    records: list[ImageRecord] = []
    rejections: list[Rejection] = []

    def run(item: tuple[Path, str]) -> ImageRecord | Rejection:
        return validate_file(item[0], item[1], min_size, max_pixels)

    results: Iterator[ImageRecord | Rejection]
    if workers > 1:
        pool = ThreadPoolExecutor(max_workers=workers)
        results = pool.map(run, files)
    else:
        pool = None
        results = map(run, files)
    try:
        for result in tqdm(results, total=len(files), desc="validate", unit="img", leave=False):
            (records if isinstance(result, ImageRecord) else rejections).append(result)
    finally:
        if pool is not None:
            pool.shutdown()
    return records, rejections
