"""Lightning ``DataModule`` over a prepared dataset (``manifest.csv`` + ``classes.json``).

Train uses the augmenting transform (optionally a class-balanced sampler); val and test always use the eval
transform, the same preprocessing the exported model ships with.

Loaders yield ``(B, H, W, 3)`` uint8 batches: workers only crop and augment, and the batch is normalised at
once after it reaches the training device (``on_after_batch_transfer``, which Lightning calls; code iterating
the loaders itself calls :meth:`PlantVillageDataModule.normalize`). Per-image float conversion in the workers
took ~40 % of their CPU time and moved 4x the bytes between processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from leaflens.data.dataset import ManifestDataset, preload_images, seed_worker_transform
from leaflens.data.prepare import load_manifest
from leaflens.data.taxonomy import load_classes
from leaflens.data.transforms import eval_transform, normalize_batch, shrink_batch, train_transform
from leaflens.logs import logger
from leaflens.preprocessing import spec_from_data_config


class PlantVillageDataModule(L.LightningDataModule):
    """Train/val/test loaders over ``processed_dir``.

    Args:
        processed_dir: Output of ``leaflens data prepare``.
        data_config: timm's resolved data config of the model (input size, interpolation, mean, std, crop).
        batch_size: Images per batch.
        num_workers: Loader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory (useful with a GPU only).
        persistent_workers: Keep workers alive between epochs (ignored with 0 workers).
        balanced_sampling: Draw training images with probability inversely proportional to their class count.
        augment: ``data.augment`` settings; ``None`` disables augmentation. Its ``low_res_epochs`` first epochs
            train on batches shrunk to ``low_res_size`` px (progressive resizing; validation stays full size).
        cache_dir: The resized ``.npy`` cache written by ``data prepare`` (``data.cache``), if any.
        memory_cache: Decode every image of the used splits once into RAM (uint8, larger photos shrunk to what
            the split's transform needs: see ``_cached_short_side``), so epochs skip JPEG decoding. ~200 KB per
            256-px image.
        train_splits: Manifest splits the model trains on. ``("train", "val")`` refits on validation too, once
            the recipe is fixed: val metrics are then no longer held out (test still is).
    """

    def __init__(
        self,
        processed_dir: str | Path,
        data_config: Mapping[str, Any],
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        balanced_sampling: bool = False,
        augment: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        memory_cache: bool = False,
        train_splits: Sequence[str] = ("train",),
    ) -> None:
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.data_config = dict(data_config)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.balanced_sampling = bool(balanced_sampling)
        self.augment = dict(augment) if augment is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_cache = bool(memory_cache)
        self.train_splits = tuple(train_splits)
        # Absent from the augment settings of runs made before progressive resizing existed: none then.
        self.low_res_epochs = int((self.augment or {}).get("low_res_epochs", 0))
        self.low_res_size = int((self.augment or {}).get("low_res_size", 0))
        if self.low_res_epochs > 0 and not 0 < self.low_res_size < max(self.data_config["input_size"][1:]):
            raise ValueError(
                f"data.augment.low_res_size must be between 0 and the input size "
                f"{list(self.data_config['input_size'][1:])}, got {self.low_res_size}"
            )
        if not self.train_splits or "test" in self.train_splits:
            raise ValueError(
                f"train_splits must name train and/or val, never test: {list(self.train_splits)}"
            )
        if "val" in self.train_splits:
            logger.warning(
                "Training on {}: val metrics are not held out, test is", "+".join(self.train_splits)
            )
        # Read now, not in setup(): the model needs the class count before the trainer starts.
        self.classes: list[dict[str, Any]] = load_classes(self.processed_dir)
        self.manifest: pd.DataFrame | None = None
        self.datasets: dict[str, ManifestDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (fit: train + val; validate: val; test/predict: test)."""
        if self.manifest is None:
            self.manifest = load_manifest(self.processed_dir)
            if self.manifest["label_id"].max() >= self.num_classes:
                raise ValueError(f"{self.processed_dir}: manifest label ids exceed classes.json")
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: ("train", "val", "test"),
        }[stage]
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def split_frame(self, split: str) -> pd.DataFrame:
        """The manifest rows of one split; ``train`` means every split in ``train_splits``."""
        if self.manifest is None:
            self.manifest = load_manifest(self.processed_dir)
        names = self.train_splits if split == "train" else (split,)
        return self.manifest[self.manifest["split"].isin(names)].reset_index(drop=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A loader's uint8 ``(B, H, W, 3)`` batch as the network's normalised float input."""
        return normalize_batch(images, self.data_config["mean"], self.data_config["std"])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = self.normalize(batch[0]), batch[1]
        if self.trains_at_low_res():
            images = shrink_batch(images, self.low_res_size)
        return images, labels

    def trains_at_low_res(self) -> bool:
        """Whether the batch being transferred is a training batch of one of the ``low_res_epochs``."""
        trainer = self.trainer
        return trainer is not None and trainer.training and trainer.current_epoch < self.low_res_epochs

    def _dataset(self, split: str) -> ManifestDataset:
        rows = self.split_frame(split)
        if rows.empty:
            logger.warning("The {} split of {} is empty", split, self.processed_dir)
        transform = (
            train_transform(self.data_config, self.augment, normalize=False)
            if split == "train"
            else eval_transform(self.data_config, normalize=False)
        )
        # Repeatable under seed_everything in the main process; workers reseed in seed_worker_transform.
        transform.set_random_seed(torch.initial_seed() % 2**32)
        images = None
        if self.memory_cache and not rows.empty:
            spec = spec_from_data_config(self.data_config)
            images = preload_images(
                rows["path"].tolist(),
                self._cached_short_side(split, spec),
                spec["interpolation"],
                rows["sha256"].tolist(),
                self.cache_dir,
            )
        return ManifestDataset(
            rows["path"].tolist(),
            rows["label_id"].tolist(),
            transform,
            sha256s=rows["sha256"].tolist(),
            cache_dir=self.cache_dir,
            images=images,
        )

    def _cached_short_side(self, split: str, spec: Mapping[str, Any]) -> int:
        """The shorter side the memory cache shrinks a split's images to (larger images only).

        Eval splits: the eval resize, so the eval transform's own resize is a no-op and outputs match decoding
        the file. Augmented training: large enough that ``RandomResizedCrop``'s narrowest crop still spans the
        input without upsampling. Caching training at the eval resize would tie the training pixels to the eval
        crop: with ``crop_pct`` 1.0, 256-px photos were shrunk to 224 before cropping, and training learnt from
        blurrier, upsampled crops than without the cache.

        Args:
            split: Manifest split the images belong to.
            spec: The model's preprocessing (``spec_from_data_config``).
        """
        _, height, width = spec["input_size"]
        eval_side = max(int(spec["resize_to"]), height, width)
        if split != "train" or self.augment is None:
            return eval_side
        # A crop of area fraction s and aspect r spans at least sqrt(s * r) of the shorter side (sqrt(s / r) for r > 1).
        scale, ratio = self.augment["scale"], self.augment["ratio"]
        narrowest = math.sqrt(float(scale[0]) * min(float(ratio[0]), 1.0 / float(ratio[1])))
        return max(eval_side, math.ceil(max(height, width) / narrowest))

    def _loader(self, split: str, shuffle: bool, sampler: WeightedRandomSampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {split} loader")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker_transform,
        )

    def class_sampler(self) -> WeightedRandomSampler:
        """Samples training images so that every present class is drawn equally often."""
        labels = torch.as_tensor(self.datasets["train"].labels)
        counts = torch.bincount(labels, minlength=self.num_classes).clamp(min=1)
        weights = (1.0 / counts.double())[labels]
        return WeightedRandomSampler(weights.tolist(), num_samples=len(labels), replacement=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            "train", shuffle=True, sampler=self.class_sampler() if self.balanced_sampling else None
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def datamodule_from_config(
    data_cfg: Mapping[str, Any], data_config: Mapping[str, Any], **loader_overrides: Any
) -> PlantVillageDataModule:
    """The DataModule a run trains with, from the ``data`` config section (training, benchmarks and profiling
    share it, so none of them drifts from what ``leaflens train`` loads).

    Args:
        data_cfg: ``cfg.data``: processed_dir, loader settings, augmentation, train_splits, on-disk cache.
        data_config: timm's resolved data config of the model.
        **loader_overrides: Replace ``data.loader`` settings, e.g. ``num_workers=0``.
    """
    processed_dir = Path(data_cfg["processed_dir"])
    return PlantVillageDataModule(
        processed_dir,
        data_config,
        **{**dict(data_cfg["loader"]), **loader_overrides},
        augment=data_cfg["augment"],
        train_splits=data_cfg["train_splits"],
        cache_dir=processed_dir / "cache" if data_cfg["cache"]["enabled"] else None,
    )
