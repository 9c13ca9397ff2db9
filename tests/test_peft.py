"""PEFT strategies: exactly the intended parameters train, frozen BatchNorms keep their statistics, LoRA
merges.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leaflens.model.factory import create_model
from leaflens.model.peft import (
    apply_peft,
    frozen_batchnorms,
    merge_adapters,
    set_train_mode,
    trainable_table,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "pretrained" / "tf_mobilenetv3_small_100.fp16.safetensors"
NUM_CLASSES = 38


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return create_model("tf_mobilenetv3_small_100", num_classes=NUM_CLASSES, pretrained_file=BUNDLED)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _steps(model: nn.Module, freeze_bn_stats: bool, steps: int = 2) -> None:
    """A few AdamW steps on random images, in training mode as the LightningModule sets it."""
    torch.manual_seed(0)
    set_train_mode(model, True, freeze_bn_stats)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, NUM_CLASSES, (4,))
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _bias_count(model: nn.Module) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith("bias") and not n.startswith("classifier")
    )


def _bn_scale_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _expected_trainable(base: nn.Module, strategy: str, **kwargs: object) -> int:
    """Independent count of what each strategy should train."""
    if kwargs.get("extra_trainable"):  # the only pattern the cases use: every BatchNorm scale
        rest = {k: v for k, v in kwargs.items() if k != "extra_trainable"}
        return _expected_trainable(base, strategy, **rest) + _bn_scale_count(base)
    head = sum(p.numel() for p in base.classifier.parameters())
    if strategy == "head":
        return head
    if strategy == "bitfit":
        return head + _bias_count(base)
    if strategy == "full":
        return sum(p.numel() for p in base.parameters())
    if strategy == "last_k":  # last 2 blocks (blocks.4.2 and blocks.5.0), conv_head and classifier
        modules = [base.blocks[4][2], base.blocks[5][0], base.conv_head, base.classifier]
        return sum(p.numel() for m in modules for p in m.parameters())
    if strategy == "lora":  # r * (in + out) per 1x1 conv adapter
        r = int(kwargs.get("lora_r", 8))
        targets = kwargs.get("lora_targets", ("conv_pw", "conv_pwl", "conv_head"))
        convs = [m for n, m in base.named_modules() if n.split(".")[-1] in targets]
        return head + sum(r * (c.in_channels + c.out_channels) for c in convs)
    raise AssertionError(strategy)


CASES = [
    ("head", {}, True),
    ("head", {}, False),
    ("bitfit", {}, True),
    ("last_k", {"last_k": 2}, True),
    ("lora", {"lora_r": 4}, True),
    ("full", {}, True),
    # BatchNorm scales on top of a strategy: per-channel rescaling of every (folded) conv.
    ("bitfit", {"extra_trainable": [r"bn\d\.weight$"]}, True),
    ("lora", {"lora_r": 2, "lora_targets": ["conv_head"], "extra_trainable": [r"bn\d\.weight$"]}, True),
]


@pytest.mark.parametrize(("strategy", "kwargs", "freeze_bn_stats"), CASES)
def test_only_intended_parameters_change(
    base: nn.Module, strategy: str, kwargs: dict, freeze_bn_stats: bool
) -> None:
    model = apply_peft(copy.deepcopy(base), strategy, **kwargs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == _expected_trainable(
        base, strategy, **kwargs
    )
    frozen_bn = {id(m) for m in frozen_batchnorms(model, freeze_bn_stats)}
    frozen_bn_buffers = {
        f"{name}.{buf}"
        for name, module in model.named_modules()
        if id(module) in frozen_bn
        for buf, _ in module.named_buffers()
    }
    before = _snapshot(model)
    _steps(model, freeze_bn_stats)
    after = model.state_dict()
    params = dict(model.named_parameters())
    for name, value in after.items():
        if name in params:
            changed = not torch.equal(before[name], value)
            assert changed == (name in trainable), f"{strategy}: {name} changed={changed}"
        elif name in frozen_bn_buffers:
            assert torch.equal(before[name], value), f"{strategy}: frozen BN buffer {name} changed"
    if strategy == "lora" and not kwargs.get("extra_trainable"):
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_extra_trainable_pattern_must_match(base: nn.Module) -> None:
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_peft(copy.deepcopy(base), "head", extra_trainable=[r"no_such_layer\.weight"])


def test_trainable_batchnorm_updates_statistics_unless_frozen(base: nn.Module) -> None:
    """full fine-tuning on a normal backbone updates BN statistics; freeze_bn_stats (folded BN) keeps them."""
    for freeze, expect_change in ((False, True), (True, False)):
        model = apply_peft(copy.deepcopy(base), "full")
        before = _snapshot(model)
        _steps(model, freeze_bn_stats=freeze, steps=1)
        key = "blocks.2.0.bn1.running_var"
        assert (not torch.equal(before[key], model.state_dict()[key])) == expect_change


def test_set_train_mode_keeps_frozen_bn_in_eval(base: nn.Module) -> None:
    model = apply_peft(copy.deepcopy(base), "bitfit")
    set_train_mode(model, True, freeze_bn_stats=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training and model.classifier.training
    set_train_mode(model, True, freeze_bn_stats=False)  # BitFit trains BN biases: then BN is not frozen
    assert all(m.training for m in bns)


def _lora_trained_then_merged(base: nn.Module, **lora: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A LoRA copy of ``base`` after a few steps, merged: ``(merged model, logits before, logits after merging)``."""
    model = apply_peft(copy.deepcopy(base), "lora", **lora)
    _steps(model, freeze_bn_stats=True)
    model.eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(images)
        merged = merge_adapters(model)
        return merged, expected, merged(images)


def test_lora_merges_into_a_plain_timm_model(base: nn.Module) -> None:
    merged, expected, actual = _lora_trained_then_merged(base, lora_r=4, lora_bias="all")
    assert type(merged) is type(base)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert merged.state_dict().keys() == base.state_dict().keys()
    # Merging changes the floating-point summation order only: float32 rounding relative to the logits' scale.
    error = (actual - expected).abs().max().item()
    assert error <= 1e-3 * expected.abs().max().item() + 1e-4, error


def test_cosine_classifier_trains_under_lora_and_survives_the_merge() -> None:
    from leaflens.model.heads import CosineClassifier

    base = create_model(
        "tf_mobilenetv3_small_100", num_classes=NUM_CLASSES, pretrained_file=BUNDLED, classifier="cosine"
    )
    merged, expected, actual = _lora_trained_then_merged(base, lora_r=4)
    head = merged.get_classifier()
    assert isinstance(head, CosineClassifier) and merged.state_dict().keys() == base.state_dict().keys()
    # The classifier trained (peft's modules_to_save) ...
    assert not torch.equal(head.weight, base.get_classifier().weight)
    assert float(head.scale) == 16  # ... and its fixed scale did not
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    assert actual.abs().max() <= 16


def test_recipe_stays_within_five_percent() -> None:
    from hydra.utils import instantiate

    from leaflens.config import load_config
    from leaflens.train.checkpoint import create_backbone

    cfg = load_config(["experiment=plantvillage_mini"], task_name="test")
    base = create_backbone(cfg, NUM_CLASSES)  # the recipe's own model config (its classifier included)
    model = instantiate(cfg.peft)(copy.deepcopy(base))
    table = trainable_table(model, cfg.peft.strategy, sum(p.numel() for p in base.parameters()))
    assert 0 < table["percent"] <= 5.0
    assert table["percent_of_all"] <= table["percent"]
    assert sum(row["trainable"] for row in table["modules"]) == table["trainable"]


def test_unknown_strategy_and_bad_k(base: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown peft strategy"):
        apply_peft(copy.deepcopy(base), "adapters")
    with pytest.raises(ValueError, match="last_k"):
        apply_peft(copy.deepcopy(base), "last_k", last_k=99)
