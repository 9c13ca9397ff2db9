"""``train(cfg) -> run directory``: build the model, data, module and trainer from the config, then fit.

Run directory (``paths.output_dir``)::

    config.yaml  classes.json  data.json  trainable.json  metrics.json  run.log
    checkpoints/best.ckpt  checkpoints/last.ckpt  logs/metrics.csv
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_data_config

from leaflens.config import save_config
from leaflens.logs import add_file_sink, logger
from leaflens.train.checkpoint import create_backbone
from leaflens.train.module import ClassifierModule


class TrainHistory(Callback):
    """Validation metrics per epoch and training speed, saved in checkpoints so resumed runs keep them."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.train_images = 0
        self.train_seconds = 0.0
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    # type: ignore[no-untyped-def]
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_images += int(batch[1].numel()) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation runs inside the training epoch in Lightning, so its time is subtracted via
        # on_validation_*.
        self.train_seconds += time.perf_counter() - self._epoch_start

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._epoch_start += time.perf_counter() - self._val_start
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.epochs.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **row})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "train_images": self.train_images, "train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])
        self.train_images = int(state_dict["train_images"])
        self.train_seconds = float(state_dict["train_seconds"])


def build_loggers(logger_cfg: Mapping[str, Any]) -> list[Logger]:
    """Instantiate ``cfg.logger`` entries; W&B runs offline unless ``WANDB_API_KEY`` is set (and offline is
    null).
    """
    loggers = []
    for name, entry in logger_cfg.items():
        if entry is None:
            continue
        extra: dict[str, Any] = {}
        if name == "wandb" and entry.get("offline") is None:
            extra["offline"] = not os.environ.get("WANDB_API_KEY")
        loggers.append(instantiate(entry, **extra))
    return loggers


def class_weights(setting: Any, dm: Any) -> list[float] | None:
    """``null``, a list of per-class weights, or ``"balanced"`` (inverse training frequency, mean 1 over
    seen).
    """
    if setting is None or (isinstance(setting, Sequence) and not isinstance(setting, str)):
        return None if setting is None else [float(w) for w in setting]
    if setting != "balanced":
        raise ValueError(f"optim.class_weights must be null, a list or 'balanced', got {setting!r}")
    counts = torch.bincount(
        torch.as_tensor(dm.split_frame("train")["label_id"].to_numpy()), minlength=dm.num_classes
    )
    seen = counts > 0
    weights = torch.ones(dm.num_classes)
    weights[seen] = counts[seen].sum() / (seen.sum() * counts[seen].double()).float()
    return weights.tolist()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@rank_zero_only
def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


@rank_zero_only
def _write_run_header(run_dir: Path, cfg: DictConfig, processed_dir: Path, trainable: dict[str, Any]) -> None:
    save_config(cfg, run_dir / "config.yaml")
    shutil.copyfile(processed_dir / "classes.json", run_dir / "classes.json")
    manifest = processed_dir / "manifest.csv"
    _write_json(
        run_dir / "data.json", {"manifest_sha256": file_sha256(manifest), "processed_dir": str(processed_dir)}
    )
    _write_json(run_dir / "trainable.json", trainable)


@rank_zero_only
def log_best_model(
    wandb_logger: WandbLogger, run_dir: Path, checkpoint: ModelCheckpoint | None, metrics: dict
) -> None:
    """Log the best checkpoint (+ classes, trainable table, metrics) as a W&B "model" artifact, "best"."""
    import wandb

    scalars = {k: v for k, v in metrics.items() if k != "history"}
    wandb_logger.experiment.summary.update(scalars)
    best = Path(checkpoint.best_model_path) if checkpoint is not None and checkpoint.best_model_path else None
    if best is None or not best.is_file():
        logger.warning("No best checkpoint to log to W&B")
        return
    artifact = wandb.Artifact(f"model-{wandb_logger.experiment.id}", type="model", metadata=scalars)
    artifact.add_file(str(best), name="best.ckpt")
    for name in ("classes.json", "trainable.json", "metrics.json", "config.yaml"):
        artifact.add_file(str(run_dir / name), name=name)
    wandb_logger.experiment.log_artifact(artifact, aliases=["best", "latest"])
    wandb_logger.experiment.finish()


def summarise(
    history: TrainHistory, checkpoint: ModelCheckpoint | None, wall_s: float, trainer: L.Trainer
) -> dict:
    """``metrics.json``: the kept epoch's validation metrics plus run facts (what sweeps and reports read).

    The kept epoch is the checkpoint's best by its monitor, or the last validated epoch when the checkpoint has
    no monitor (a refit on train + val keeps the last epoch: validation was trained on and picks nothing).
    """
    keep_last = checkpoint is not None and not checkpoint.monitor
    monitor = checkpoint.monitor if checkpoint is not None and checkpoint.monitor else "val_acc"
    mode_max = checkpoint is None or checkpoint.mode == "max"
    scored = [e for e in history.epochs if monitor in e]
    if keep_last:
        best = scored[-1] if scored else {}
    else:
        best = (max if mode_max else min)(scored, key=lambda e: e[monitor]) if scored else {}
    return {
        **{k: v for k, v in best.items() if k.startswith("val_")},
        "best_epoch": best.get("epoch"),
        "monitor": None if keep_last else monitor,
        "epochs_trained": trainer.current_epoch,
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_s, 2),
        "train_images": history.train_images,
        "train_img_per_s": round(history.train_images / history.train_seconds, 1)
        if history.train_seconds
        else None,
        "world_size": trainer.world_size,
        "history": history.epochs,
    }


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Fine-tune ``cfg.model`` with ``cfg.peft`` on ``cfg.data.processed_dir`` and return the run directory.

    Args:
        cfg: The resolved config (``leaflens.config.load_config``).
        callbacks: Extra Lightning callbacks (e.g. an Optuna pruning callback), added to ``cfg.callbacks``.

    Returns:
        ``cfg.paths.output_dir``, holding config, classes, data hash, checkpoints, metrics and
        trainable table.
    """
    from leaflens.data.datamodule import datamodule_from_config
    from leaflens.model.peft import trainable_table

    run_dir = Path(cfg.paths.output_dir)
    processed_dir = Path(cfg.data.processed_dir)
    is_rank_zero = rank_zero_only.rank == 0  # type: ignore[attr-defined]
    sink = add_file_sink(run_dir / "run.log") if is_rank_zero else None
    try:
        L.seed_everything(cfg.seed, workers=True)
        torch.set_float32_matmul_precision("high")
        # Deterministic mode otherwise fills every new tensor with NaN first (~5 % of a CPU step, profiling.md);
        # results stay bit-identical without it.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]

        from leaflens.data.taxonomy import load_classes

        num_classes = len(load_classes(processed_dir))
        net = create_backbone(cfg, num_classes)
        data_config = resolve_data_config({}, model=net)
        base_total = sum(p.numel() for p in net.parameters())
        net = instantiate(cfg.peft)(net)
        trainable = trainable_table(net, cfg.peft.strategy, base_total)
        logger.info(
            "Strategy {}: {:,} of {:,} parameters train ({:.2f} %)",
            cfg.peft.strategy,
            trainable["trainable"],
            trainable["total"],
            trainable["percent"],
        )

        dm = datamodule_from_config(cfg.data, data_config)
        module = ClassifierModule(
            net,
            num_classes,
            optimizer=instantiate(cfg.optim.optimizer),
            scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
            weight_decay=cfg.optim.weight_decay,
            label_smoothing=cfg.optim.label_smoothing,
            target_margin=cfg.optim.target_margin,
            class_weights=class_weights(cfg.optim.class_weights, dm),
            freeze_bn_stats=cfg.model.freeze_bn_stats,
            channels_last=cfg.optim.channels_last,
            mixup=instantiate(cfg.optim.mixup) if cfg.optim.get("mixup") else None,
            # A plain dict: the checkpoint stores it, and weights_only loading refuses a DictConfig.
            lr_scales={str(key): float(scale) for key, scale in cfg.optim.lr_scales.items()},
        )
        history = TrainHistory()
        all_callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [
            history,
            *callbacks,
        ]
        loggers = build_loggers(cfg.logger)
        if not loggers:  # logger=none: the LR monitor has nowhere to write and Lightning refuses it
            all_callbacks = [c for c in all_callbacks if not isinstance(c, LearningRateMonitor)]
        _write_run_header(run_dir, cfg, processed_dir, trainable)
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=all_callbacks, logger=loggers or False, default_root_dir=str(run_dir)
        )
        for log in loggers:
            log.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]

        start = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        wall_s = time.perf_counter() - start

        callbacks_used = trainer.callbacks  # type: ignore[attr-defined]
        # The checkpoint that selects the best epoch (a monitored one), not the one that keeps the last epoch.
        checkpoint = next(
            (c for c in callbacks_used if isinstance(c, ModelCheckpoint) and c.monitor),
            next((c for c in callbacks_used if isinstance(c, ModelCheckpoint)), None),
        )
        metrics = summarise(history, checkpoint, wall_s, trainer)
        _write_json(run_dir / "metrics.json", metrics)
        logger.info(
            "{} epoch {}: val_acc {:.4f}, val_f1 {:.4f}; {:.0f} s, {} img/s -> {}",
            "Best" if metrics["monitor"] else "Last",
            metrics["best_epoch"],
            metrics.get("val_acc", float("nan")),
            metrics.get("val_f1", float("nan")),
            wall_s,
            metrics["train_img_per_s"],
            run_dir,
        )
        for log in loggers:
            if isinstance(log, WandbLogger):
                log_best_model(log, run_dir, checkpoint, metrics)
        return run_dir
    finally:
        if sink is not None:
            logger.remove(sink)
