"""The Lightning DataModule over the prepared bundled sample."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from leaflens.data.datamodule import PlantVillageDataModule
from leaflens.data.prepare import load_manifest
from leaflens.images import decode_image
from leaflens.preprocessing import preprocess, spec_from_data_config


def _dm(processed: Path, data_config: dict, **kwargs: object) -> PlantVillageDataModule:
    options = {"batch_size": 16, "num_workers": 0, "persistent_workers": False} | kwargs
    return PlantVillageDataModule(processed, data_config, **options)


def test_batches_have_the_model_input(prepared_root: Path, data_config: dict, augment: dict) -> None:
    processed = prepared_root / "processed"
    dm = _dm(processed, data_config, augment=augment)
    assert dm.num_classes == len(json.loads((processed / "classes.json").read_text())) == 38
    dm.setup("fit")
    raw, labels = next(iter(dm.train_dataloader()))
    _, height, width = data_config["input_size"]
    # Workers ship uint8 (H, W, 3); the batch becomes the network input after transfer.
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (16, height, width, 3)
    images, same_labels = dm.on_after_batch_transfer((raw, labels), 0)
    assert images.dtype == torch.float32 and tuple(images.shape) == (16, *data_config["input_size"])
    assert same_labels is labels
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert torch.isfinite(images).all()
    assert labels.min() >= 0 and labels.max() < dm.num_classes
    # Label ids index classes.json and agree with the manifest's class names.
    manifest = load_manifest(processed)
    names = {c["id"]: c["name"] for c in dm.classes}
    assert (manifest["label"] == manifest["label_id"].map(names)).all()
    assert len(dm.datasets["train"]) == int((manifest["split"] == "train").sum())


def test_val_and_test_are_never_augmented(prepared_root: Path, data_config: dict, augment: dict) -> None:
    processed = prepared_root / "processed"
    dm = _dm(processed, data_config, augment=augment)
    dm.setup("fit")
    dm.setup("test")
    spec = spec_from_data_config(data_config)
    for split, loader in (("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        first, second = (dm.on_after_batch_transfer(next(iter(loader())), 0) for _ in range(2))
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        rows = dm.split_frame(split).head(len(first[0]))
        expected = np.stack([preprocess(decode_image(p), spec) for p in rows["path"]])
        np.testing.assert_allclose(first[0].numpy(), expected, atol=1e-5)
        assert first[1].tolist() == rows["label_id"].tolist()
    # ...whereas two passes over the same training image differ.
    train = dm.datasets["train"]
    assert not torch.equal(train[0][0], train[0][0])


def test_memory_cache_gives_the_same_eval_pixels(prepared_root: Path, data_config: dict) -> None:
    processed = prepared_root / "processed"
    plain, cached = _dm(processed, data_config), _dm(processed, data_config, memory_cache=True)
    plain.setup("validate")
    cached.setup("validate")
    assert cached.datasets["val"].images is not None
    a, b = next(iter(plain.val_dataloader())), next(iter(cached.val_dataloader()))
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-5)
    assert torch.equal(a[1], b[1])


def test_memory_cache_does_not_tie_training_pixels_to_the_eval_crop(
    prepared_root: Path, data_config: dict, augment: dict
) -> None:
    # With crop_pct 1.0 the eval resize is 224 px; the 256-px sample photos must still reach the random crop whole.
    whole_photo = {**data_config, "crop_pct": 1.0}
    first_train_images = []
    for memory_cache in (False, True):
        torch.manual_seed(0)  # the training transform draws from a seed taken when the dataset is built
        dm = _dm(prepared_root / "processed", whole_photo, augment=augment, memory_cache=memory_cache)
        dm.setup("fit")
        first_train_images.append(dm.datasets["train"][0][0])
    assert dm.datasets["train"].images is not None
    assert min(dm.datasets["train"].images[0].shape[:2]) == 256
    assert torch.equal(*first_train_images)
    # Eval splits are still cached at the eval resize.
    assert min(dm.datasets["val"].images[0].shape[:2]) == 224


def test_worker_processes_load_batches(prepared_root: Path, data_config: dict, augment: dict) -> None:
    dm = _dm(
        prepared_root / "processed", data_config, augment=augment, num_workers=2, persistent_workers=True
    )
    dm.setup("fit")
    seen = sum(len(labels) for _, labels in dm.train_dataloader())
    assert seen == len(dm.datasets["train"])


def test_balanced_sampler_evens_out_classes(prepared_root: Path, data_config: dict, tmp_path: Path) -> None:
    # An imbalanced copy: class 0 keeps every training image, the others keep one each.
    source = prepared_root / "processed"
    processed = tmp_path / "processed"
    shutil.copytree(source, processed)
    stats = json.loads((processed / "stats.json").read_text())
    stats["raw_dir"] = str((source / stats["raw_dir"]).resolve())
    (processed / "stats.json").write_text(json.dumps(stats))
    manifest = pd.read_csv(processed / "manifest.csv")
    train = manifest[manifest["split"] == "train"]
    keep = train[train["label_id"] == 0].index.tolist() + train.groupby("label_id").head(1).index.tolist()
    manifest = pd.concat([manifest[manifest["split"] != "train"], manifest.loc[sorted(set(keep))]])
    manifest.to_csv(processed / "manifest.csv", index=False)

    dm = _dm(processed, data_config, balanced_sampling=True)
    dm.setup("fit")
    labels = dm.datasets["train"].labels
    counts = Counter(labels)
    assert counts[0] >= 5 * min(counts.values())
    torch.manual_seed(0)
    drawn = Counter(labels[i] for _ in range(300) for i in dm.class_sampler())
    shares = np.array([drawn[c] for c in counts]) / sum(drawn.values())
    np.testing.assert_allclose(shares, 1 / len(counts), atol=0.25 / len(counts))
    plain = Counter(labels[i] for i in torch.randperm(len(labels)).tolist())
    assert plain[0] / len(labels) > 3 / len(counts)  # without the sampler class 0 dominates


def test_missing_processed_dir_is_a_clear_error(tmp_path: Path, data_config: dict) -> None:
    with pytest.raises(FileNotFoundError, match="leaflens data prepare"):
        PlantVillageDataModule(tmp_path, data_config)


def test_refit_on_val_trains_on_train_and_val_but_never_test(prepared_root: Path, data_config: dict) -> None:
    processed = prepared_root / "processed"
    manifest = load_manifest(processed)
    dm = _dm(processed, data_config, train_splits=["train", "val"])
    dm.setup("fit")
    trained = set(dm.split_frame("train")["sha256"])
    assert trained == set(manifest.loc[manifest["split"].isin(["train", "val"]), "sha256"])
    assert len(dm.datasets["train"]) == int(manifest["split"].isin(["train", "val"]).sum())
    assert trained.isdisjoint(manifest.loc[manifest["split"] == "test", "sha256"])
    assert len(dm.datasets["val"]) == int((manifest["split"] == "val").sum())  # still validated on


def test_training_on_test_is_refused(prepared_root: Path, data_config: dict) -> None:
    with pytest.raises(ValueError, match="never test"):
        _dm(prepared_root / "processed", data_config, train_splits=["train", "test"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_low_res_epochs_train_on_shrunk_batches_and_validate_at_full_size(
    prepared_root: Path, data_config: dict, augment: dict
) -> None:
    """Progressive resizing: the first `low_res_epochs` epochs' training batches are shrunk to `low_res_size`;
    later epochs and every validation batch keep the model's input size."""
    import lightning as L

    class ShapeRecorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(4, 38),
            )
            self.seen: list[tuple[str, int, tuple[int, ...]]] = []

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            images, labels = batch
            assert torch.isfinite(images).all()
            self.seen.append(("train", self.current_epoch, tuple(images.shape[1:])))
            return torch.nn.functional.cross_entropy(self.net(images), labels)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            self.seen.append(("val", self.current_epoch, tuple(batch[0].shape[1:])))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    full = tuple(data_config["input_size"])
    assert full[1] == full[2], "the configured input is square; shrink_batch scales its longer side"
    dm = _dm(
        prepared_root / "processed", data_config, augment=augment | {"low_res_epochs": 2, "low_res_size": 160}
    )
    recorder = ShapeRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(recorder, datamodule=dm)
    low = (3, 160, 160)
    assert recorder.seen == [
        *[("train", 0, low)] * 2,
        ("val", 0, full),
        *[("train", 1, low)] * 2,
        ("val", 1, full),
        *[("train", 2, full)] * 2,
        ("val", 2, full),
    ]


def test_a_low_res_size_not_under_the_input_size_is_refused(
    prepared_root: Path, data_config: dict, augment: dict
) -> None:
    side = max(data_config["input_size"][1:])
    with pytest.raises(ValueError, match="low_res_size"):
        _dm(
            prepared_root / "processed",
            data_config,
            augment=augment | {"low_res_epochs": 1, "low_res_size": side},
        )
