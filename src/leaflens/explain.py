"""Grad-CAM overlays ("where did the model look?") with the maintained ``pytorch-grad-cam`` library.

The target layer is found from the model itself (timm's ``feature_info``: the last feature stage, else the
last module with a spatial output), so it works for any timm CNN, not just MobileNetV3. torch and timm are
imported lazily: the API only pays for them when a client asks for ``?explain=true``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leaflens.preprocessing import center_crop, preprocess, resize_shorter_side

if TYPE_CHECKING:
    from torch import nn


def find_target_layer(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)
) -> tuple[str, nn.Module]:
    """The module whose activations Grad-CAM should use: ``(name, module)``.

    Prefers the last stage of timm's ``feature_info``; otherwise (or if that output is not a 4-D feature map)
    the last module, in execution order, whose output is a feature map with a spatial size above 1x1.
    """
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: Any, _inp: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
                order.append(name)

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for handle in hooks:
            handle.remove()

    def spatial(name: str) -> bool:
        shape = shapes.get(name, ())
        return len(shape) == 4 and shape[2] > 1 and shape[3] > 1

    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        last = feature_info[-1]
        name = last["module"] if isinstance(last, Mapping) else getattr(last, "module", None)
        if name and spatial(name):
            return name, model.get_submodule(name)
    for name in reversed(order):
        if spatial(name):
            return name, model.get_submodule(name)
    raise ValueError(f"{type(model).__name__} has no module with a spatial feature map; Grad-CAM needs a CNN")


def cropped_view(rgb: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The ``(h, w, 3)`` uint8 region of ``rgb`` the model actually sees (resized and centre-cropped)."""
    _, height, width = spec["input_size"]
    resized = resize_shorter_side(rgb, max(int(spec["resize_to"]), height, width), spec["interpolation"])
    return center_crop(resized, height, width)


def gradcam_overlays(
    model: nn.Module,
    images: list[np.ndarray],
    class_ids: list[int],
    spec: Mapping[str, Any],
    layer: nn.Module | None = None,
) -> list[np.ndarray]:
    """Grad-CAM heat maps for ``class_ids`` blended over the model's view of each RGB image (uint8 arrays).

    ``model`` stays untouched: its parameters' ``requires_grad`` flags are restored afterwards.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if not images:
        return []
    if layer is None:
        _, layer = find_target_layer(model, tuple(spec["input_size"]))
    batch = torch.from_numpy(np.stack([preprocess(image, spec) for image in images]))
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        # Frozen (PEFT) parameters leave no graph to back-propagate through; enable them just for this pass.
        for p in model.parameters():
            p.requires_grad_(True)
        with GradCAM(model=model, target_layers=[layer]) as cam:
            heat = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(c)) for c in class_ids])
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    return [
        show_cam_on_image(cropped_view(image, spec).astype(np.float32) / 255.0, mask, use_rgb=True)
        for image, mask in zip(images, heat, strict=True)
    ]


def load_package_model(package_dir: str | Path) -> nn.Module:
    """Rebuild the plain timm model of a (verified) package from ``model.json`` + ``weights.safetensors``."""
    from safetensors.torch import load_file

    from leaflens.model.factory import create_model
    from leaflens.serving.package import PackageError, load_package

    package = load_package(package_dir)
    weights = package.dir / "weights.safetensors"
    if "weights.safetensors" not in package.files:
        raise PackageError(f"model package {package.dir} has no weights.safetensors; Grad-CAM needs it")
    info = package.model_info
    model = create_model(
        info["arch"],
        int(info["num_classes"]),
        pretrained=False,
        checkpoint_follows=True,
        output_stride=int(info.get("output_stride", 32)),
        # Packages from before model.classifier existed have a linear one.
        classifier=str(info.get("classifier", "linear")),
        cosine_scale=float(info.get("cosine_scale", 16.0)),
        exportable=True,
    )
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@lru_cache(maxsize=4)
def _cached(package_dir: str) -> tuple[Any, dict[str, Any], Any, threading.Lock]:
    from leaflens.serving.package import load_package

    model = load_package_model(package_dir)
    spec = load_package(package_dir).preprocess
    _, layer = find_target_layer(model, tuple(spec["input_size"]))
    return model, spec, layer, threading.Lock()


def explain_package_image(package_dir: str | Path, rgb: np.ndarray, class_id: int) -> np.ndarray:
    """Grad-CAM overlay ``(h, w, 3)`` uint8 of ``class_id`` for one RGB image, with the package's model.

    The model is loaded once per package directory and reused; calls are serialised per model because
    Grad-CAM registers hooks on it.
    """
    model, spec, layer, lock = _cached(str(Path(package_dir).expanduser().resolve()))
    with lock:
        return gradcam_overlays(model, [rgb], [class_id], spec, layer)[0]
