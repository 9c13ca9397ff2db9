"""Build a timm classifier by name, with ImageNet weights from the Hugging Face hub or from a local file.

Never falls back silently to random weights: random init only with ``pretrained=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import timm
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn

from leaflens.logs import logger
from leaflens.model.heads import CLASSIFIERS, set_classifier

# Raised by huggingface_hub / requests / urllib when the hub cannot be reached (all subclass OSError except
# the
# hub's own offline error, which we import lazily because huggingface_hub is optional for timm).
_HUB_FIX = (
    "Could not download ImageNet weights for {name!r} from the Hugging Face hub ({error}). "
    "Fix it with one of: "
    "use the bundled offline backbone (`model=mobilenetv3_small_offline`); pass a local weights file "
    "(`model.pretrained_file=/path/to/weights.safetensors`, "
    "a safetensors file or torch state dict for {name!r}); "
    "set HF_ENDPOINT / HF_HUB_OFFLINE with a populated cache; or train from scratch on purpose with "
    "`model.pretrained=false`."
)


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm's normal install
        pass
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _hub_weights_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo_id, filename), str)
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )


def check_hub_reachable(name: str, timeout_s: float = 5.0) -> None:
    """Fail at once, with the fix, when ``name``'s weights must come from an unreachable hub.

    huggingface_hub retries a refused connection with back-off for about a minute; a single quick request
    first turns that minute into an immediate, actionable error. Cached weights and offline mode need no network.
    """
    import requests
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id or constants.HF_HUB_OFFLINE or _hub_weights_cached(repo_id):
        return
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        requests.head(url, timeout=timeout_s, allow_redirects=False)
    except requests.RequestException as error:
        raise RuntimeError(_HUB_FIX.format(name=name, error=f"{type(error).__name__} for {url}")) from error


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    pretrained_file: str | Path | None = None,
    checkpoint_follows: bool = False,
    output_stride: int = 32,
    classifier: str = "linear",
    cosine_scale: float = 16.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create the timm model ``name`` with a fresh ``num_classes``-way classifier.

    Args:
        name: Any timm architecture name, e.g. ``mobilenetv3_large_100``.
        num_classes: Number of output classes (from the data's ``classes.json``).
        pretrained: Load ImageNet weights. ``False`` means random init (explicitly asked for).
        pretrained_file: A local safetensors file or torch state dict for ``name``. Loaded through timm, so a
            classifier of another size is dropped and every other key must match. Implies ``pretrained``.
        checkpoint_follows: The caller loads trained weights into the model right away (rebuilding a run), so
            a random initialisation is not worth a warning.
        output_stride: Input pixels per cell of the last feature map. Below the network's own (32), the last
            stride-2 stages run at stride 1 with dilated convolutions instead (``dilate_to_output_stride``):
            a finer final map from the same weights and parameter count, for more compute.
        classifier: ``linear`` (timm's) or ``cosine``: scaled cosines between the L2-normalised features and
            class weights, no bias (``leaflens.model.heads.CosineClassifier``).
        cosine_scale: The cosine classifier's fixed logit scale (logits lie in ``[-scale, scale]``).
        **timm_kwargs: Passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ``exportable``...).
            ``pretrained_cfg_overlay`` (e.g. ``{"input_size": [3, 256, 256], "crop_pct": 1.0}``) changes the
            preprocessing the model owns, which every stage resolves from it.

    Returns:
        The model in train mode; ``model.pretrained_cfg`` holds its preprocessing.

    Raises:
        FileNotFoundError: ``pretrained_file`` does not exist.
        RuntimeError: Weights had to come from the hub and the hub could not be reached (message says
        how to fix).
        ValueError: ``classifier`` is not one of ``heads.CLASSIFIERS`` (checked before any weights load).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"model.classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    model = _timm_model(name, num_classes, pretrained, pretrained_file, checkpoint_follows, **timm_kwargs)
    return set_classifier(dilate_to_output_stride(model, output_stride), classifier, cosine_scale)


def _timm_model(
    name: str,
    num_classes: int,
    pretrained: bool,
    pretrained_file: str | Path | None,
    checkpoint_follows: bool,
    **timm_kwargs: Any,
) -> nn.Module:
    """:func:`create_model` before the output stride: the timm model with its weights from where they come."""
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained_file={path} does not exist. "
                f"Point it at a safetensors/torch weights file for "
                f"{name!r}, or set model.pretrained_file=null to download weights from the Hugging Face hub."
            )
        logger.info("Model {}: {} classes, weights from {}", name, num_classes, path)
        overlay = {**(timm_kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(path)}
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **timm_kwargs
        )
    if not pretrained:
        if checkpoint_follows:
            logger.debug(
                "Model {}: {} classes, architecture only (weights come from a checkpoint)", name, num_classes
            )
        else:
            logger.warning(
                "Model {}: {} classes, RANDOM initialisation (model.pretrained=false)", name, num_classes
            )
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    logger.info("Model {}: {} classes, ImageNet weights from the Hugging Face hub", name, num_classes)
    check_hub_reachable(name)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **timm_kwargs)
    except _hub_errors() as error:
        raise RuntimeError(_HUB_FIX.format(name=name, error=f"{type(error).__name__}: {error}")) from error


def dilate_to_output_stride(model: nn.Module, output_stride: int) -> nn.Module:
    """Trade the last downsamplings of a timm EfficientNet-family model (MobileNetV3, EfficientNet...) for dilation.

    timm builds this only into the feature-extractor variants of these models; this is the same conversion
    (``EfficientNetBuilder``) applied to a built classifier: the block that would take the network past
    ``output_stride`` keeps its weights but runs at stride 1, and every later spatial convolution dilates by
    the stride skipped, so it covers the same part of the photo at twice the resolution per skipped stride.

    Args:
        model: A timm model with ``conv_stem`` and ``blocks`` (stages of blocks), in place.
        output_stride: 32 (unchanged), 16 or 8.

    Returns:
        ``model``.

    Raises:
        ValueError: ``output_stride`` is not 8, 16 or 32, or the model is not of the EfficientNet family.
    """
    if output_stride == 32:
        return model
    if output_stride not in (8, 16):
        raise ValueError(f"model.output_stride must be 8, 16 or 32, got {output_stride}")
    if not (hasattr(model, "conv_stem") and hasattr(model, "blocks")):
        raise ValueError(
            f"model.output_stride={output_stride} is supported for timm's EfficientNet-family models "
            f"(MobileNetV3, EfficientNet...), not {type(model).__name__}"
        )
    stem = cast(nn.Conv2d, model.conv_stem)
    stages = cast(nn.Sequential, model.blocks)
    stride, dilation = stem.stride[0], 1
    for block in (block for stage in stages for block in stage.children()):
        spatial = [m for m in block.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
        block_stride = max((conv.stride[0] for conv in spatial), default=1)
        next_dilation = dilation
        if stride * block_stride > output_stride:
            next_dilation = dilation * block_stride
            block_stride = 1
        for conv in spatial:
            if block_stride == 1:
                conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            # timm's "same" convs work out their padding for the dilation as they run; the others pad statically.
            if not isinstance(conv, (Conv2dSame, Conv2dSameExport)):
                conv.padding = tuple(dilation * (k - 1) // 2 for k in conv.kernel_size)
        stride *= block_stride
        dilation = next_dilation
    # Export writes it to model.json, so that Grad-CAM rebuilds this network (torch types attributes as modules).
    model.output_stride = output_stride  # type: ignore[assignment]
    return model
