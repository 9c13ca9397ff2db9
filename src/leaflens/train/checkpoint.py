"""Rebuild a trained network from a run directory: ``load_run(run_dir) -> LoadedRun``.

Evaluation, export and Grad-CAM use this; it needs no network access (the architecture is built without
pretrained weights, then the checkpoint's weights are loaded) and returns a plain timm ``nn.Module`` (LoRA
merged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_data_config
from torch import nn

from leaflens.model.peft import merge_adapters

# model.* keys that configure training, not the factory.
_NOT_FACTORY_KEYS = ("freeze_bn_stats", "test_time_flips")
# The LightningModule stores the network under this attribute name.
_NET_PREFIX = "net."


def create_backbone(cfg: DictConfig, num_classes: int, **overrides: Any) -> nn.Module:
    """The timm model of ``cfg.model`` (``create_model``) with ``num_classes`` outputs."""
    container = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(container, dict)
    factory = {k: v for k, v in container.items() if k not in _NOT_FACTORY_KEYS}
    return instantiate(factory, num_classes=num_classes, **overrides)


def build_network(cfg: DictConfig, num_classes: int, **overrides: Any) -> nn.Module:
    """:func:`create_backbone` with the ``cfg.peft`` strategy applied (what the LightningModule trains)."""
    return instantiate(cfg.peft)(create_backbone(cfg, num_classes, **overrides))


@dataclass
class LoadedRun:
    """A trained run, ready for inference.

    Attributes:
        model: Plain timm classifier (adapters merged), eval mode, on CPU, returning logits.
        classes: Records of ``classes.json`` (index = class id).
        data_config: timm's resolved data config (input size, interpolation, crop, mean, std).
        cfg: The run's resolved config.
        run_dir: Where it was loaded from.
        checkpoint: The checkpoint file the weights came from.
    """

    model: nn.Module
    classes: list[dict[str, Any]]
    data_config: dict[str, Any]
    cfg: DictConfig
    run_dir: Path
    checkpoint: Path

    @property
    def train_splits(self) -> list[str]:
        """The splits the run trained on (``data.train_splits``; runs from before that setting: train)."""
        return list(self.cfg.data.get("train_splits", ["train"]))

    @property
    def test_time_flips(self) -> bool:
        """Whether inference averages the four flips of each image (``model.test_time_flips``)."""
        return bool(self.cfg.model.get("test_time_flips", False))


def network_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The network's weights in a Lightning checkpoint (``state_dict`` entries under ``net.``)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {
        k.removeprefix(_NET_PREFIX): v for k, v in payload["state_dict"].items() if k.startswith(_NET_PREFIX)
    }
    if not state:
        raise ValueError(f"{checkpoint} holds no network weights (no 'net.' keys in its state_dict)")
    return state


def load_run(run_dir: str | Path, which: str = "best", **factory_overrides: Any) -> LoadedRun:
    """Load ``run_dir/checkpoints/<which>.ckpt`` into a plain network.

    Args:
        run_dir: A directory written by ``leaflens.train.run.train``.
        which: ``best`` or ``last``.
        **factory_overrides: Extra ``timm.create_model`` arguments, e.g. ``exportable=True`` for ONNX export.

    Raises:
        FileNotFoundError: The directory is not a complete run (names the missing file).
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoints" / f"{which}.ckpt"
    for required in (run_dir / "config.yaml", run_dir / "classes.json", checkpoint):
        if not required.is_file():
            raise FileNotFoundError(f"{run_dir} is not a complete training run: {required.name} is missing")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert isinstance(cfg, DictConfig)
    classes = json.loads((run_dir / "classes.json").read_text())
    # Architecture only: the checkpoint holds every weight, so no hub or weights file is needed.
    net = build_network(
        cfg,
        len(classes),
        pretrained=False,
        pretrained_file=None,
        checkpoint_follows=True,
        **factory_overrides,
    )
    net.load_state_dict(network_state(checkpoint), strict=True)
    model = merge_adapters(net).eval()
    return LoadedRun(
        model=model,
        classes=classes,
        data_config=dict(resolve_data_config({}, model=model)),
        cfg=cfg,
        run_dir=run_dir,
        checkpoint=checkpoint,
    )
