"""The classifier on top of a timm model's pooled features: timm's own linear layer or a cosine classifier.

A cosine classifier scores a photo by the cosine between its (L2-normalised) feature vector and each class's
(L2-normalised) weight vector, times a fixed scale: ``logits = s * cos(f, w_c)``, no bias. Only the direction of
the features counts, not their norm, which fits a head trained on few photos per class on top of features
made for ImageNet (as in few-shot learning: Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019).
The scale sets how peaked the softmax can get (logits lie in ``[-s, s]``). Same parameter count as the linear
layer minus its bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIERS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """``logits = scale * cos(x, weight_c)`` for every class ``c``.

    Args:
        in_features: Size of the feature vector.
        out_features: Number of classes.
        scale: Fixed logit scale (a buffer, not trained: it goes with the weights into checkpoints and exports).
    """

    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine classifier scale must be > 0, got {scale}")
        self.in_features = in_features
        self.out_features = out_features
        # nn.Linear's initialisation; only the directions of the rows matter.
        self.weight = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scale={float(self.scale):g}"
        )


def classifier_name(model: nn.Module) -> str:
    """Name of the classifier module of a timm model (``pretrained_cfg["classifier"]``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if not name or not isinstance(name, str):
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['classifier']; is it a timm model?")
    return name


def set_classifier(model: nn.Module, kind: str = "linear", cosine_scale: float = 16.0) -> nn.Module:
    """Give a timm model the classifier ``kind``, in place.

    Args:
        model: A timm model whose classifier (``pretrained_cfg["classifier"]``) is a linear layer.
        kind: ``linear`` (timm's own, unchanged) or ``cosine`` (:class:`CosineClassifier`, freshly initialised).
        cosine_scale: The cosine classifier's logit scale.

    Returns:
        ``model``.

    Raises:
        ValueError: Unknown ``kind``, or the model's classifier is not a linear layer.
    """
    if kind not in CLASSIFIERS:
        raise ValueError(f"model.classifier must be one of {CLASSIFIERS}, got {kind!r}")
    if kind == "linear":
        return model
    name = classifier_name(model)
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"model.classifier={kind} replaces a linear classifier; {type(model).__name__}.{name} is "
            f"{type(linear).__name__}"
        )
    model.set_submodule(name, CosineClassifier(linear.in_features, linear.out_features, cosine_scale))
    return model


def classifier_info(model: nn.Module) -> dict[str, float | str]:
    """What rebuilds the classifier of ``model`` (``model.json``): ``{"classifier": kind[, "cosine_scale": s]}``."""
    head = model.get_submodule(classifier_name(model))
    if isinstance(head, CosineClassifier):
        return {"classifier": "cosine", "cosine_scale": float(head.scale)}
    return {"classifier": "linear"}
