"""Parameter-efficient fine-tuning: choose which parameters of a timm classifier train.

Strategies (``configs/peft/*.yaml``):

- ``head``: only the classifier (a probe: linear or cosine, ``model.classifier``);
- ``bitfit``: every bias (conv, BatchNorm, squeeze-excite) + the classifier;
- ``lora``: LoRA adapters (the ``peft`` library) on 1x1 convs + the classifier in ``modules_to_save``,
  optionally with every bias trained too (``lora_bias="all"`` = LoRA + BitFit); merged into plain weights for
  export;
- ``last_k``: the last ``k`` blocks, everything after them (``conv_head``) and the classifier;
- ``full``: everything.

Any strategy can also train the parameters whose names match ``extra_trainable`` (regexes), e.g. the BatchNorm
scales (``bn1.weight``, ``bn2.weight``...: a per-channel rescaling of every conv, a few thousand numbers) or
depthwise kernels.

BatchNorm layers whose parameters are all frozen stay in eval mode during training (their running statistics
never change); with ``freeze_bn_stats`` every BatchNorm does, which backbones with folded BN require.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch import nn

from leaflens.model.heads import classifier_name

STRATEGIES = ("head", "bitfit", "lora", "last_k", "full")
# Prefix peft puts in front of the wrapped model's parameter names.
_PEFT_PREFIX = "base_model.model."


def _last_blocks_prefixes(model: nn.Module, k: int) -> list[str]:
    """Module-name prefixes of the last ``k`` blocks plus every top-level module after ``blocks``."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(
            f"last_k needs a timm model with a `blocks` sequence; {type(model).__name__} has none"
        )
    flat: list[str] = []
    for stage_name, stage in blocks.named_children():
        if isinstance(stage, nn.Sequential):
            flat += [f"blocks.{stage_name}.{block}" for block, _ in stage.named_children()]
        else:
            flat.append(f"blocks.{stage_name}")
    if not 1 <= k <= len(flat):
        raise ValueError(f"last_k={k} must be between 1 and the number of blocks ({len(flat)})")
    children = [name for name, _ in model.named_children()]
    after = children[children.index("blocks") + 1 :]
    return flat[-k:] + after


def _lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str] | str,
    bias: str,
    rank_pattern: dict[str, int] | None,
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=[classifier_name(model)],
        bias=bias,  # type: ignore[arg-type]  # validated by LoraConfig
        rank_pattern=dict(rank_pattern or {}),
    )
    return get_peft_model(model, config)


def apply_peft(
    model: nn.Module,
    strategy: str,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] | str = ("conv_pw", "conv_pwl", "conv_head"),
    lora_rank_pattern: dict[str, int] | None = None,
    lora_bias: str = "none",
    last_k: int = 2,
    extra_trainable: Sequence[str] = (),
) -> nn.Module:
    """Freeze ``model`` according to ``strategy`` and return the model to train.

    Args:
        model: A timm classifier (its classifier already sized for the task).
        strategy: One of :data:`STRATEGIES`.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        lora_dropout: Dropout on the LoRA input.
        lora_targets: Module-name suffixes, or one regex matched against full names, that get LoRA adapters.
            Must be 1x1 (or ungrouped) convs or linears: LoRA cannot wrap depthwise convs.
        lora_rank_pattern: Per-module rank overrides (peft's ``rank_pattern``), e.g. ``{"conv_head": 4}``.
        lora_bias: ``"none"`` or ``"all"`` (every bias also trains: LoRA + BitFit).
        last_k: Number of trailing blocks that train with ``last_k``.
        extra_trainable: Regexes (``re.search``) over parameter names of the plain model; every match also
            trains, whatever the strategy. A LoRA-wrapped module's own weight is named ``<module>.weight`` here.

    Returns:
        ``model`` itself, or a ``peft.PeftModel`` wrapping it for ``lora``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown peft strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "lora":
        model = _lora(model, lora_r, lora_alpha, lora_dropout, lora_targets, lora_bias, lora_rank_pattern)
        return _train_also(model, extra_trainable)
    head = classifier_name(model)
    prefixes = {
        "head": [head],
        "bitfit": [head],
        "last_k": _last_blocks_prefixes(model, last_k) if strategy == "last_k" else [],
        "full": [""],
    }[strategy]
    for name, param in model.named_parameters():
        trains = any(name == p or name.startswith(f"{p}.") or p == "" for p in prefixes)
        param.requires_grad_(trains or (strategy == "bitfit" and name.endswith("bias")))
    return _train_also(model, extra_trainable)


def _plain_name(name: str) -> str:
    """Parameter name as in the plain timm model (peft's wrapper prefixes removed)."""
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def _train_also(model: nn.Module, patterns: Sequence[str]) -> nn.Module:
    """Unfreeze the parameters whose plain names match any of ``patterns``; a pattern matching none is an error."""
    for pattern in patterns:
        regex = re.compile(pattern)
        # LoRA's own tensors and peft's frozen copy of the classifier are never the target of a name pattern.
        matches = [
            param
            for name, param in model.named_parameters()
            if regex.search(_plain_name(name)) and "lora_" not in name and ".original_module." not in name
        ]
        if not matches:
            raise ValueError(f"peft.extra_trainable pattern {pattern!r} matches no parameter of the model")
        for param in matches:
            param.requires_grad_(True)
    return model


def frozen_batchnorms(model: nn.Module, freeze_bn_stats: bool) -> list[nn.Module]:
    """BatchNorm layers that must stay in eval mode: all of them with ``freeze_bn_stats``, else the frozen
    ones.
    """
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (freeze_bn_stats or not any(p.requires_grad for p in module.parameters()))
    ]


def set_train_mode(model: nn.Module, mode: bool = True, freeze_bn_stats: bool = False) -> nn.Module:
    """``model.train(mode)``, then put the BatchNorms of :func:`frozen_batchnorms` back in eval mode."""
    model.train(mode)
    if mode:
        for module in frozen_batchnorms(model, freeze_bn_stats):
            module.eval()
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """The plain model: LoRA merged into the weights (``merge_and_unload``); other models unchanged."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _group(name: str) -> str:
    """Table row of a parameter: ``blocks.4`` for blocks, else the top-level module (adapter prefixes
    removed).
    """
    name = name.removeprefix(_PEFT_PREFIX)
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else parts[0]


def trainable_table(model: nn.Module, strategy: str, base_total: int | None = None) -> dict[str, Any]:
    """Trainable-parameter counts: overall and per module (what ``trainable.json`` stores).

    ``percent`` is relative to ``base_total``, the size of the plain model that ships (LoRA merged, no
    duplicate classifier); ``percent_of_all`` is relative to every parameter present while training (adapters
    included).
    """
    rows: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "total": 0})
    trainable = total = 0
    for name, param in model.named_parameters():
        row = rows[_group(name)]
        row["total"] += param.numel()
        total += param.numel()
        if param.requires_grad:
            row["trainable"] += param.numel()
            trainable += param.numel()
    base_total = base_total or total
    return {
        "strategy": strategy,
        "trainable": trainable,
        "total": base_total,
        "total_while_training": total,
        "percent": round(100.0 * trainable / base_total, 3),
        "percent_of_all": round(100.0 * trainable / total, 3),
        "modules": [{"module": k, **v} for k, v in rows.items()],
    }
