"""The LightningModule that fine-tunes a classifier: loss, optimiser/schedule, metrics, BN handling.

The network itself stays a plain ``nn.Module`` (``self.net``) built elsewhere (``leaflens.model``); this class
only adds the training loop around it, so evaluation and export use the network without Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from leaflens.logs import logger
from leaflens.model.peft import set_train_mode

OptimizerFactory = Callable[[Iterable[dict]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]
# Builds a batch mixer (e.g. ``timm.data.Mixup``) from ``num_classes`` and ``label_smoothing``; the mixer maps
# ``(images, labels)`` to ``(mixed images, (B, num_classes) soft targets)``.
MixupFactory = Callable[..., Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]


def _warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
    min_warmup_steps: int = 0,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio`` x the peak
    LR.

    The warm-up lasts at least ``min_warmup_steps`` (but never more than half the run): a fraction alone gives a
    run on a small dataset only a handful of warm-up steps.
    """
    warmup_steps = max(1, round(warmup_fraction * total_steps), min(min_warmup_steps, total_steps // 2))
    factor = partial(
        _warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, factor)


def ema_decay_at(step: int, decay: float) -> float:
    """The decay of the EMA's update number ``step``: ``min(decay, (1 + step) / (10 + step))``.

    The warm-up (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``) makes the average follow the weights
    closely early on, so a short run is not dominated by its random initial classifier. It is slow: the decay
    reaches 0.99 only after 890 updates and 0.995 after 1,790, so a shorter run averages over fewer steps than
    ``decay`` says (:meth:`EMA.on_fit_start` logs what the run will reach).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(
    averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor, decay: float
) -> None:
    """One EMA step over a group of same-dtype tensors (``AveragedModel``'s ``multi_avg_fn``), in place.

    One fused ``_foreach_lerp_`` per group instead of one Python expression per tensor: 11 instead of 19 ms per
    optimizer step on 2 CPU cores for the recipe's MobileNetV3-Small (a step takes ~430 ms).
    """
    weight = 1.0 - ema_decay_at(int(num_averaged), decay)
    if averaged[0].is_floating_point():
        torch._foreach_lerp_(averaged, current, weight)
    else:  # integer buffers (BatchNorm's num_batches_tracked) have no lerp
        for avg, cur in zip(averaged, current, strict=True):
            avg.copy_(avg + (cur - avg) * weight)


class EMA(WeightAveraging):
    """Exponential moving average of the weights with a decay warm-up; used for validation and checkpoints.

    Args:
        decay: Final decay per optimizer step (e.g. 0.99 averages over the last ~100 steps).
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__(multi_avg_fn=partial(_ema_update, decay=decay), use_buffers=True)
        self.decay = decay

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # a no-op in WeightAveraging today; keeps any it gains later
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            return
        reached = ema_decay_at(int(steps), self.decay)
        # Averaging windows (1 / (1 - decay) steps): a window under 80 % of the configured one is a different
        # setting from the one asked for, so say so instead of letting `decay` look effective.
        if (1.0 - self.decay) / (1.0 - reached) < 0.8:
            logger.warning(
                "EMA decay {} is never reached in this run's {} optimizer steps: its warm-up ends at {:.4f} "
                "(an average over ~{:.0f} steps, not {:.0f}); a lower decay or a longer run changes the average",
                self.decay,
                int(steps),
                reached,
                1.0 / (1.0 - reached),
                1.0 / (1.0 - self.decay),
            )
        else:
            logger.info("EMA decay reaches {:.4f} in this run's {} optimizer steps", reached, int(steps))


def parameter_groups(
    net: nn.Module, weight_decay: float, lr_scales: Mapping[str, float] | None = None
) -> list[dict]:
    """Trainable parameters split so that biases and norm weights (1-D tensors) get no weight decay.

    Args:
        net: The model; only parameters with ``requires_grad`` are grouped.
        weight_decay: Weight decay of the weight matrices.
        lr_scales: Learning-rate multipliers by parameter name: a trainable parameter whose name matches a key
            (a regex, ``re.search``) takes that key's multiplier, the first matching key's if several do. E.g.
            ``{"lora_B": 2}`` is LoRA+ (Hayou et al. 2024). Stored as the groups' ``lr_scale`` for
            :meth:`ClassifierModule.configure_optimizers` to apply. Without scales the groups are the plain two.

    Raises:
        ValueError: If a key of ``lr_scales`` matches no trainable parameter (a typo would otherwise change
            nothing, silently).
    """
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    scales = dict(lr_scales or {})
    for pattern in scales:
        if not any(re.search(pattern, name) for name, _ in trainable):
            raise ValueError(f"optim.lr_scales: {pattern!r} matches no trainable parameter")

    def scale_of(name: str) -> float:
        return next((float(s) for pattern, s in scales.items() if re.search(pattern, name)), 1.0)

    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in trainable:
        groups.setdefault((scale_of(name), p.ndim > 1), []).append(p)
    # Unscaled groups first, weight matrices before the rest: without scales, the plain two groups in their old
    # order, so earlier runs train (and resume) exactly as before.
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != 1.0, not item[0][1]))
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0}
        | ({"lr_scale": scale} if scale != 1.0 else {})
        for (scale, decays), params in ordered
    ]


class ClassifierModule(L.LightningModule):
    """Cross-entropy fine-tuning of ``net`` with accuracy and macro-F1 on validation.

    Args:
        net: The classifier (a timm model, possibly wrapped by peft), already frozen as the strategy wants.
        num_classes: Number of classes (the size of ``net``'s output).
        optimizer: ``torch.optim`` factory taking parameter groups (a Hydra ``_partial_``).
        scheduler: LR scheduler factory taking ``(optimizer, total_steps=...)``, stepped every optimizer step.
        weight_decay: Weight decay for weight matrices (biases and norms get none).
        label_smoothing: Cross-entropy label smoothing.
        target_margin: Subtracted from each training image's true-class logit before the loss (for mixed
            targets, in proportion to each class's share): an additive margin, which with a cosine classifier
            of scale ``s`` is CosFace's ``s * m`` (Wang et al., CVPR 2018). Validation and test losses and all
            predictions use the plain logits. 0 is plain cross-entropy.
        class_weights: Optional per-class loss weights (length ``num_classes``).
        freeze_bn_stats: Keep every BatchNorm in eval mode (folded-BN backbones); frozen BNs always are.
        channels_last: Train in channels-last memory format (faster convolutions on CPU and GPU).
        mixup: Optional MixUp/CutMix factory (``timm.data.Mixup`` as a Hydra ``_partial_``), called with
            ``num_classes`` and ``label_smoothing=0`` (the loss applies ``label_smoothing`` to the mixed targets).
            Training batches of odd size (an epoch's last) stay unmixed: pairs are the batch and its reverse.
        lr_scales: Learning-rate multipliers by parameter-name regex (:func:`parameter_groups`), e.g.
            ``{"lora_B": 2}``; empty trains every parameter at the optimizer's learning rate. Needs a
            ``LambdaLR`` schedule.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        target_margin: float = 0.0,
        class_weights: Sequence[float] | None = None,
        freeze_bn_stats: bool = False,
        channels_last: bool = True,
        mixup: MixupFactory | None = None,
        lr_scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "mixup"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.freeze_bn_stats = freeze_bn_stats
        self.weight_decay = weight_decay
        self.lr_scales = dict(lr_scales or {})
        self.channels_last = channels_last
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        if weights is not None and weights.numel() != num_classes:
            raise ValueError(f"class_weights has {weights.numel()} entries, expected {num_classes}")
        self.register_buffer("class_weights", weights, persistent=False)
        self.label_smoothing = label_smoothing
        if target_margin < 0:
            raise ValueError(f"optim.target_margin must be >= 0, got {target_margin}")
        self.target_margin = target_margin
        self.mixup = mixup(num_classes=num_classes, label_smoothing=0.0) if mixup is not None else None
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> ClassifierModule:
        # Frozen (or folded) BatchNorms must never see batch statistics: they go back to eval mode.
        super().train(mode)
        set_train_mode(self.net, mode, self.freeze_bn_stats)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.x never calls train() itself (it saves and restores each submodule's flag around
        # validation), so the BatchNorm modes are set here, before every training epoch.
        self.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices, or against ``(B, C)`` class probabilities (mixed targets)."""
        return F.cross_entropy(
            logits.float(),
            labels,
            weight=self.class_weights,  # type: ignore[arg-type]
            label_smoothing=self.label_smoothing,
        )

    def _with_margin(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits`` less ``target_margin`` on the true class (class indices) or on each class's share of the
        target (``(B, C)`` probabilities)."""
        if self.target_margin == 0:
            return logits
        shares = targets if targets.ndim == 2 else F.one_hot(targets, logits.shape[-1])
        return logits - self.target_margin * shares.to(logits.dtype)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None and labels.numel() % 2 == 0:
            images, targets = self.mixup(images, labels)
        loss = self._loss(self._with_margin(self(images), targets), targets)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=labels.numel())
        return loss

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, prefix: str
    ) -> None:
        images, labels = batch
        logits = self(images)
        metrics.update(logits, labels)
        self.log(
            f"{prefix}_loss",
            self._loss(logits, labels),
            prog_bar=True,
            batch_size=labels.numel(),
            sync_dist=True,
        )
        self.log_dict(metrics, prog_bar=True, batch_size=labels.numel())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def configure_optimizers(self) -> Any:
        groups = parameter_groups(self.net, self.weight_decay, self.lr_scales)
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        # Schedulers that set every group's learning rate from one number (OneCycleLR's max_lr) would undo the
        # scaling silently.
        if any("lr_scale" in g for g in optimizer.param_groups) and not isinstance(scheduler, LambdaLR):
            raise ValueError(
                f"optim.lr_scales needs a scheduler that scales each group's own learning rate "
                f"(optim=adamw_cosine), not {type(scheduler).__name__}"
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
