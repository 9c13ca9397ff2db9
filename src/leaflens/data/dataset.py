"""A torch ``Dataset`` over manifest rows: decode (``leaflens.images.decode_image``), transform, label.

Images come from three places, fastest first: an in-memory uint8 cache filled once by :func:`preload_images`
(shared with forked loader workers copy-on-write), the resized ``.npy`` cache written by ``data prepare``
(``data.cache``), or the original file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from leaflens.images import ImageDecodeError, decode_image
from leaflens.preprocessing import resize_shorter_side


def load_rgb(path: str | Path, sha256: str | None = None, cache_dir: Path | None = None) -> np.ndarray:
    """An image as ``(H, W, 3)`` uint8 RGB, from ``cache_dir/<sha256>.npy`` when present, else decoded."""
    if cache_dir is not None and sha256:
        cached = cache_dir / f"{sha256}.npy"
        if cached.is_file():
            return np.load(cached)
    try:
        return decode_image(path)
    except ImageDecodeError as err:
        # Name the file: the error may surface from a loader worker far from the manifest row.
        raise ImageDecodeError(err.reason, f"{path}: {err}") from err


def preload_images(
    paths: Sequence[str],
    short_side: int,
    interpolation: str,
    sha256s: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    workers: int = 2,
) -> list[np.ndarray]:
    """Decode every image once and shrink its shorter side to ``short_side`` (never enlarged).

    With ``short_side`` equal to the eval resize and the model's interpolation, the eval transform's own
    resize becomes a no-op, so eval outputs are identical to decoding the file directly.
    """
    hashes = list(sha256s) if sha256s is not None else [None] * len(paths)

    def load(index: int) -> np.ndarray:
        rgb = load_rgb(paths[index], hashes[index], cache_dir)
        if min(rgb.shape[:2]) > short_side:
            rgb = resize_shorter_side(rgb, short_side, interpolation)
        return np.ascontiguousarray(rgb)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(
            tqdm(pool.map(load, range(len(paths))), total=len(paths), desc="preload", unit="img", leave=False)
        )


class ManifestDataset(Dataset):
    """``(image tensor, label id)`` pairs for a list of files.

    The image is whatever ``transform`` returns as a tensor: ``[3, h, w]`` float32 from a normalising
    transform, or ``[h, w, 3]`` uint8 from one built with ``normalize=False``.

    Args:
        paths: Absolute image paths.
        labels: Label id (index in ``classes.json``) of each path.
        transform: An Albumentations ``Compose`` returning a tensor or an array under ``"image"``.
        sha256s: Content hashes, used to find images in ``cache_dir``.
        cache_dir: The resized ``.npy`` cache of ``data prepare``, if any.
        images: Pre-decoded images (see :func:`preload_images`), same order as ``paths``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[..., dict[str, Any]],
        sha256s: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        images: Sequence[np.ndarray] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels must have the same length")
        if images is not None and len(images) != len(paths):
            raise ValueError("images must match paths one to one")
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.sha256s = list(sha256s) if sha256s is not None else None
        self.cache_dir = cache_dir
        self.images = images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            rgb = self.images[index]
        else:
            sha = self.sha256s[index] if self.sha256s is not None else None
            rgb = load_rgb(self.paths[index], sha, self.cache_dir)
        image = self.transform(image=rgb)["image"]
        if isinstance(image, np.ndarray):
            # A no-op transform hands back the decoded (possibly read-only, cached) array itself.
            writable = image.flags.writeable and image.flags.c_contiguous
            image = torch.from_numpy(image if writable else np.array(image, order="C"))
        return image, self.labels[index]


def seed_worker_transform(worker_id: int) -> None:
    """``worker_init_fn``: give each loader worker its own augmentation stream.

    Albumentations' ``Compose`` keeps its own generators, which forked workers would otherwise all copy; the
    worker seed derives from torch's base seed, so ``seed_everything`` still makes runs repeatable.
    """
    info = get_worker_info()
    if info is None:
        return
    transform = getattr(info.dataset, "transform", None)
    reseed = getattr(transform, "set_random_seed", None)
    if reseed is not None:
        reseed(info.seed % 2**32)
