"""``profile(cfg) -> directory``: where time goes in the data pipeline and in training steps.

1. Data pipeline: pyinstrument over ``profile.data_batches`` batches of the training DataLoader, run
   in-process (workers hide their work from a profiler) -> ``data_pipeline.html`` + the call tree.
2. Training: ``leaflens.train.run.train`` for ``profile.warmup_steps`` + ``profile.active_steps`` steps with a
   callback that times every step, splits it into *waiting for the batch* vs *forward/backward/optimizer*,
   and runs the torch profiler over the active steps -> ``trace.json`` (Perfetto / chrome://tracing).
3. ``summary.md`` (readable) and ``profile.json`` (numbers).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from leaflens.logs import logger

# glibc malloc settings measured in BASELINES.md / reports/profiling.md; reported so a profile says what it
# ran with.
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


class StepProfiler(Callback):
    """Times training steps and the waits for batches between them; torch-profiles the active steps."""

    def __init__(self, warmup_steps: int, active_steps: int, trace_path: Path) -> None:
        self.warmup_steps = warmup_steps
        self.active_steps = active_steps
        self.trace_path = trace_path
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.images = 0
        self._batch_end: float | None = None
        self._batch_start = 0.0
        self.profiler: torch.profiler.profile | None = None
        self.top_ops = ""

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._batch_end = time.perf_counter()  # the first wait includes starting the loader (workers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self.wait_s.append(now - self._batch_end)
        if batch_idx == self.warmup_steps and self.profiler is None:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True, with_stack=False
            )
            self.profiler.__enter__()
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self._batch_start)
        self.images += int(batch[1].numel())
        self._batch_end = now
        if self.profiler is not None and batch_idx + 1 == self.warmup_steps + self.active_steps:
            self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._stop()

    def _stop(self) -> None:
        if self.profiler is None or self.top_ops:
            return
        self.profiler.__exit__(None, None, None)
        self.profiler.export_chrome_trace(str(self.trace_path))
        self.top_ops = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def _data_config(cfg: DictConfig) -> tuple[dict[str, Any], int]:
    from timm.data import resolve_data_config

    from leaflens.data.taxonomy import load_classes
    from leaflens.train.checkpoint import create_backbone

    num_classes = len(load_classes(Path(cfg.data.processed_dir)))
    return dict(resolve_data_config({}, model=create_backbone(cfg, num_classes))), num_classes


def profile_data(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """pyinstrument over the train DataLoader in the main process; returns throughput and the call tree."""
    from pyinstrument import Profiler

    from leaflens.data.datamodule import datamodule_from_config

    data_config, _ = _data_config(cfg)
    dm = datamodule_from_config(cfg.data, data_config, num_workers=0)
    dm.setup("fit")
    profiler = Profiler(interval=0.001)
    images, batches = 0, 0
    start = time.perf_counter()
    with profiler:
        for images_batch, _labels in dm.train_dataloader():
            images_batch = dm.normalize(images_batch)
            images += int(images_batch.shape[0])
            batches += 1
            if batches >= int(cfg.profile.data_batches):
                break
    seconds = time.perf_counter() - start
    (out / "data_pipeline.html").write_text(profiler.output_html())
    tree = profiler.output_text(unicode=False, color=False, show_all=False)
    return {
        "batches": batches,
        "images": images,
        "seconds": round(seconds, 3),
        "img_per_s": round(images / seconds, 1) if seconds else None,
        "call_tree": tree,
    }


def profile_training(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """A few real training steps through ``train(cfg)``, each timed, the active ones torch-profiled."""
    from leaflens.train.run import train

    warmup, active = int(cfg.profile.warmup_steps), int(cfg.profile.active_steps)
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = str(out / "run")
        run_cfg.trainer.max_epochs = 1
        run_cfg.trainer.limit_train_batches = warmup + active
        run_cfg.trainer.limit_val_batches = 0
        run_cfg.trainer.enable_progress_bar = False
        run_cfg.logger = {}
        # No validation runs, so nothing to checkpoint or stop on; other callbacks (EMA...) are kept.
        dropped = ("checkpoint", "early_stopping")
        run_cfg.callbacks = {k: v for k, v in run_cfg.callbacks.items() if k not in dropped}
    timer = StepProfiler(warmup, active, out / "trace.json")
    train(run_cfg, callbacks=[timer])
    measured = slice(warmup, None)  # the first steps include lazy init and allocator warm-up
    step, wait = timer.step_s[measured], timer.wait_s[measured]
    batch = int(cfg.data.loader.batch_size)
    total = sum(step) + sum(wait)
    return {
        "steps_timed": len(step),
        "step_ms": round(1000 * sum(step) / max(1, len(step)), 1),
        "data_wait_ms": round(1000 * sum(wait) / max(1, len(wait)), 1),
        "data_wait_share": round(sum(wait) / total, 3) if total else None,
        "img_per_s": round(batch * len(step) / total, 1) if total else None,
        "first_step_ms": round(1000 * timer.step_s[0], 1) if timer.step_s else None,
        "top_ops": timer.top_ops,
    }


def _summary(result: dict[str, Any]) -> str:
    data, training = result["data"], result["training"]
    lines = [
        "# Profile",
        "",
        f"Model `{result['model']}`, strategy `{result['strategy']}`, batch {result['batch_size']}, "
        f"{result['threads']} torch threads, {result['num_workers']} loader workers; "
        f"malloc env: {result['malloc_env']}",
        "",
        "## Where a training step's time goes",
        "",
        f"- {training['steps_timed']} steps after {result['warmup_steps']} warm-up steps: "
        f"**{training['img_per_s']} img/s**",
        f"- compute (forward + backward + optimizer): {training['step_ms']} ms per step",
        f"- waiting for the next batch: {training['data_wait_ms']} ms per step "
        f"({100 * (training['data_wait_share'] or 0):.0f} % of the time)",
        f"- first step (lazy init): {training['first_step_ms']} ms",
        "",
        "Top operators by self CPU time (torch profiler, active steps; full trace: `trace.json`):",
        "",
        "```",
        training["top_ops"].rstrip(),
        "```",
        "",
        "## Data pipeline (train loader, in-process)",
        "",
        f"{data['batches']} batches, {data['images']} images in {data['seconds']} s: "
        f"**{data['img_per_s']} img/s** for one process (times the workers for the loader's ceiling). "
        "Call tree (pyinstrument; interactive: `data_pipeline.html`):",
        "",
        "```",
        *data["call_tree"].rstrip().splitlines()[:60],
        "```",
        "",
    ]
    return "\n".join(lines)


def profile(cfg: DictConfig) -> Path:
    """Profile the data pipeline and a few training steps; write ``summary.md``, ``profile.json``, traces.

    Returns:
        ``paths.output_dir`` with ``summary.md``, ``profile.json``, ``trace.json``, ``data_pipeline.html``.
    """
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.data.processed_dir) / "manifest.csv").is_file():
        raise FileNotFoundError(
            f"no prepared data in {cfg.data.processed_dir}: run `leaflens data prepare` first"
        )
    logger.info("Profiling the data pipeline ({} batches)", cfg.profile.data_batches)
    data = profile_data(cfg, out)
    logger.info("Profiling {} + {} training steps", cfg.profile.warmup_steps, cfg.profile.active_steps)
    training = profile_training(cfg, out)
    result = {
        "model": str(cfg.model.name),
        "strategy": str(cfg.peft.strategy),
        "batch_size": int(cfg.data.loader.batch_size),
        "num_workers": int(cfg.data.loader.num_workers),
        "threads": torch.get_num_threads(),
        "channels_last": bool(cfg.optim.get("channels_last", False)),
        "malloc_env": {k: os.environ[k] for k in MALLOC_VARS if k in os.environ} or "glibc defaults",
        "warmup_steps": int(cfg.profile.warmup_steps),
        "data": data,
        "training": training,
    }
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(_summary(result))
    logger.info(
        "Training {} img/s ({} % waiting for data); data pipeline {} img/s per process -> {}",
        training["img_per_s"], round(100 * (training["data_wait_share"] or 0)), data["img_per_s"], out,
    )  # fmt: skip
    return out
