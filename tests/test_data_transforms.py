"""Albumentations pipelines: model input size, dtype and normalisation; eval == serving preprocessing."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from conftest import SAMPLE_DIR
from leaflens.data.transforms import eval_transform, normalize_batch, shrink_batch, train_transform
from leaflens.images import decode_image
from leaflens.preprocessing import preprocess, spec_from_data_config


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return decode_image(next(Path(SAMPLE_DIR, "Apple___Apple_scab").glob("*.JPG")))


def _variants(data_config: dict) -> list[dict]:
    return [
        data_config,
        {**data_config, "input_size": (3, 128, 128)},
        {**data_config, "input_size": (3, 160, 192), "interpolation": "bicubic", "crop_pct": 0.95},
        {**data_config, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    ]


@pytest.mark.parametrize("size", [(256, 256), (300, 451), (183, 97), (1000, 640)])
def test_eval_transform_equals_serving_preprocess(data_config: dict, photo: np.ndarray, size: tuple) -> None:
    image = cv2.resize(photo, size[::-1], interpolation=cv2.INTER_AREA)
    for config in _variants(data_config):
        ours = eval_transform(config)(image=image)["image"]
        theirs = preprocess(image, spec_from_data_config(config))
        assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32
        assert tuple(ours.shape) == tuple(config["input_size"])
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)


def test_normalisation_comes_from_the_data_config(data_config: dict) -> None:
    for config in _variants(data_config):
        mean = np.asarray(config["mean"])
        std = np.asarray(config["std"])
        for value in (0, 128, 255):
            image = np.full((300, 300, 3), value, np.uint8)
            out = eval_transform(config)(image=image)["image"].numpy()
            expected = (value / 255.0 - mean) / std
            np.testing.assert_allclose(out.mean(axis=(1, 2), dtype=np.float64), expected, atol=1e-5)
            np.testing.assert_allclose(out.std(axis=(1, 2), dtype=np.float64), 0.0, atol=1e-5)


@pytest.mark.parametrize("size", [(256, 256), (300, 451)])
def test_uint8_output_normalised_per_batch_equals_serving_preprocess(
    data_config: dict, photo: np.ndarray, size: tuple
) -> None:
    image = cv2.resize(photo, size[::-1], interpolation=cv2.INTER_AREA)
    for config in _variants(data_config):
        raw = eval_transform(config, normalize=False)(image=image)["image"]
        assert raw.dtype == np.uint8 and raw.shape == (*config["input_size"][1:], 3)
        batch = normalize_batch(
            torch.from_numpy(np.stack([raw, raw[::-1].copy()])), config["mean"], config["std"]
        )
        assert batch.dtype == torch.float32 and tuple(batch.shape) == (2, *config["input_size"])
        theirs = preprocess(image, spec_from_data_config(config))
        np.testing.assert_allclose(batch[0].numpy(), theirs, atol=1e-5)
        np.testing.assert_allclose(batch[1].numpy(), theirs[:, ::-1], atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(1, 8, 8, 3), (0.5,) * 3, (0.5,) * 3)


def test_train_transform_shapes_and_randomness(data_config: dict, augment: dict, photo: np.ndarray) -> None:
    for config in _variants(data_config):
        transform = train_transform(config, augment)
        outs = [transform(image=photo)["image"] for _ in range(4)]
        for out in outs:
            assert out.dtype == torch.float32 and tuple(out.shape) == tuple(config["input_size"])
            assert torch.isfinite(out).all()
        assert any(not torch.equal(outs[0], other) for other in outs[1:]), "augmentation must vary"


def test_train_transform_is_seedable(data_config: dict, augment: dict, photo: np.ndarray) -> None:
    first, second = train_transform(data_config, augment), train_transform(data_config, augment)
    first.set_random_seed(5)
    second.set_random_seed(5)
    assert torch.equal(first(image=photo)["image"], second(image=photo)["image"])


def test_no_augment_means_eval(data_config: dict, photo: np.ndarray) -> None:
    assert torch.equal(
        train_transform(data_config, None)(image=photo)["image"],
        eval_transform(data_config)(image=photo)["image"],
    )


def test_identity_augment_matches_crop_statistics(data_config: dict, augment: dict) -> None:
    # With every random step switched off except the crop, a constant image stays the normalised constant.
    quiet = {**augment, "hflip": 0, "vflip": 0, "rotate_p": 0, "color_p": 0, "blur_p": 0}
    image = np.full((256, 256, 3), 200, np.uint8)
    out = train_transform(data_config, quiet)(image=image)["image"].numpy()
    expected = (200 / 255.0 - np.asarray(data_config["mean"])) / np.asarray(data_config["std"])
    np.testing.assert_allclose(out.mean(axis=(1, 2), dtype=np.float64), expected, atol=1e-4)


def test_random_erasing_replaces_one_patch_and_is_absent_when_off(data_config: dict, augment: dict) -> None:
    # Off (the default) adds no transform, so the random stream, and every earlier run's crops, stay as they were.
    assert augment["erase_p"] == 0
    quiet = {**augment, "hflip": 0, "vflip": 0, "rotate_p": 0, "color_p": 0, "blur_p": 0}
    default = train_transform(data_config, quiet).transforms
    assert not any(isinstance(t, A.Erasing) for t in default)
    erasing = {**quiet, "erase_p": 1.0, "erase_scale": [0.05, 0.1]}
    assert len(train_transform(data_config, erasing).transforms) == len(default) + 1
    image = np.full((256, 256, 3), 200, np.uint8)
    out = train_transform(data_config, erasing, normalize=False)(image=image)["image"]
    changed = (out != 200).any(axis=-1)
    # One rectangle of 5-10 % of the crop (a random pixel can equal 200 in all three channels, rarely).
    assert 0.04 < changed.mean() <= 0.1
    rows, cols = np.nonzero(changed)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert changed.sum() / box > 0.99


def test_shrink_batch_scales_the_longer_side_and_keeps_the_mean() -> None:
    images = torch.randn(2, 3, 200, 100)
    small = shrink_batch(images, 100)
    assert small.shape == (2, 3, 100, 50)
    # An antialiased 2x reduction averages neighbourhoods: per-image means barely move.
    torch.testing.assert_close(small.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=2e-2, rtol=0)
