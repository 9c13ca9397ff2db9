"""Training throughput: end-to-end (data loader + Lightning + model) vs model-only steps on the same batches.

    python scripts/bench_train.py --processed data/processed [key=value ...]

Runs the real training config (default ``experiment=plantvillage_mini``) through ``lightning.Trainer.fit`` for
``--warmup + --steps`` batches, recording every batch; then replays the recorded batches through the same
LightningModule's training step + backward + optimizer step with no loader. Both are measured in one process, so
the ratio (end-to-end / model-only; target >= 0.9 on CPU) is meaningful even on a noisy, shared machine.
``--rounds`` repeats the pair, each round in a fresh process as a real run is (one ``fit`` per process: a second
``fit`` in the same process ran its end-to-end loop 10-20 % slower while the model-only replay did not change),
and the median is reported. Prints the numbers and writes the ``## Training`` section of
``reports/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _malloc import reexec_with_malloc_env

reexec_with_malloc_env()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from timm.data import resolve_data_config  # noqa: E402

from leaflens.config import load_config  # noqa: E402
from leaflens.data.datamodule import PlantVillageDataModule, datamodule_from_config  # noqa: E402
from leaflens.data.taxonomy import load_classes  # noqa: E402
from leaflens.train.checkpoint import create_backbone  # noqa: E402
from leaflens.train.module import ClassifierModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class BatchClock(Callback):
    """Wall time from the end of the warm-up batches to the last batch; keeps every (normalised) batch.

    Lightning hands over a fresh batch every step and never reuses it, so keeping references is enough (a copy
    would be timed as part of the end-to-end loop).
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.start = self.end = 0.0
        self.images = 0

    # type: ignore[no-untyped-def]
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((batch[0], batch[1]))
        now = time.perf_counter()
        if batch_idx + 1 == self.warmup:
            self.start = now
        elif batch_idx + 1 > self.warmup:
            self.end = now
            self.images += int(batch[1].numel())


def model_only(module: ClassifierModule, batches: list, warmup: int) -> float:
    """Images/s of forward + loss + backward + AdamW on in-memory batches (no loader, no Lightning loop)."""
    module.train()
    optimizer = module.optimizer_factory(
        [{"params": [p for p in module.net.parameters() if p.requires_grad], "weight_decay": 0.0}]
    )
    start, images = 0.0, 0
    for index, batch in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        # What ClassifierModule.training_step computes, without Lightning's logging.
        loss = module._loss(module(batch[0]), batch[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= warmup:
            images += int(batch[1].numel())
    return images / (time.perf_counter() - start)


def write_section(path: Path, body: str, title: str = "## Training") -> None:
    """Replace (or append) the ``title`` section of a markdown file, leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        new = text.rstrip("\n") + f"\n\n{title}\n\n{body.strip()}\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join([*lines[:start], title, "", body.strip(), "", *lines[end:]]).rstrip("\n") + "\n"
    path.write_text(new)


def measure_round(
    module: ClassifierModule, dm: PlantVillageDataModule, cfg: DictConfig, warmup: int, steps: int
) -> tuple[float, float, float]:
    """One round: ``warmup + steps`` batches through ``Trainer.fit``, then the same batches model-only.

    Returns:
        End-to-end img/s, model-only img/s and their ratio.
    """
    clock = BatchClock(warmup)
    batches = warmup + steps
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        precision=cfg.trainer.precision,
    )
    trainer.fit(module, datamodule=dm)
    if len(clock.batches) < batches:
        raise SystemExit(f"only {len(clock.batches)} training batches available; lower --steps")
    end_to_end = clock.images / (clock.end - clock.start)
    model = model_only(module, clock.batches, warmup)
    return end_to_end, model, end_to_end / model


def one_round(cfg: DictConfig, processed: Path, warmup: int, steps: int) -> dict:
    """One measured round on a freshly built module and DataModule (what a child process runs)."""
    L.seed_everything(cfg.seed)
    num_classes = len(load_classes(processed))
    net = create_backbone(cfg, num_classes)
    data_config = resolve_data_config({}, model=net)
    net = instantiate(cfg.peft)(net)
    dm = datamodule_from_config(cfg.data, data_config)
    module = ClassifierModule(
        net,
        num_classes,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=None,
        freeze_bn_stats=cfg.model.freeze_bn_stats,
        channels_last=cfg.optim.channels_last,
    )
    end_to_end, model, ratio = measure_round(module, dm, cfg, warmup, steps)
    return {
        "end_to_end": end_to_end,
        "model_only": model,
        "ratio": ratio,
        "input_size": list(data_config["input_size"]),
    }


def child_round(args: argparse.Namespace) -> dict:
    """Runs :func:`one_round` in a fresh process (as a real training run is) and returns its numbers."""
    command = [
        sys.executable,
        __file__,
        "--one-round",
        f"--processed={args.processed}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        *args.overrides,
    ]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"round: end-to-end {result['end_to_end']:.1f} img/s, model-only {result['model_only']:.1f} img/s, "
        f"ratio {result['ratio']:.2f}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, required=True, help="a prepared data.processed_dir")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="measured batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the report gives each and the median")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "benchmarks.md")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides (default experiment=plantvillage_mini)"
    )
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()

    overrides = args.overrides or ["experiment=plantvillage_mini"]
    cfg = load_config([*overrides, f"data.processed_dir={args.processed}", "logger=none"], task_name="bench")
    if args.one_round:
        print(json.dumps(one_round(cfg, args.processed, args.warmup, args.steps)))
        return
    load_before = os.getloadavg()[0]
    rounds = [child_round(args) for _ in range(args.rounds)]
    load_after = os.getloadavg()[0]
    median = statistics.median(r["ratio"] for r in rounds)
    input_size = tuple(rounds[0]["input_size"])

    loader = cfg.data.loader
    body = (
        f"`python scripts/bench_train.py --processed <prepared mini set> {' '.join(overrides)}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"peft={cfg.peft.strategy}, model={cfg.model.name}, input {input_size}, "
        f"batch {loader.batch_size}, {loader.num_workers} loader workers, "
        f"memory_cache={loader.get('memory_cache', False)}; "
        f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} measured batches; "
        f"load average {load_before:.1f} before, {load_after:.1f} after)\n\n"
        "| round | end-to-end training img/s (loader + augmentation + Lightning + step) "
        "| model-only step img/s, same batches (forward + backward + AdamW) | ratio |\n|---|---:|---:|---:|\n"
        + "".join(
            f"| {i} | {r['end_to_end']:.1f} | {r['model_only']:.1f} | {r['ratio']:.2f} |\n"
            for i, r in enumerate(rounds, 1)
        )
        + f"\n**Median ratio end-to-end / model-only over {len(rounds)} rounds: {median:.2f}** (target >= 0.9).\n\n"
        "Each round is a fresh process that builds the module and the loaders, trains through `Trainer.fit` and "
        "then replays the same batches, so both numbers of a round share the machine's state; the machine is "
        "shared, so absolute values move between rounds and runs, and the ratio is what this benchmark checks. "
        "The EMA of the weights (a callback of the real training run) is not part of either loop."
    )
    print(body)
    write_section(args.report, body)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
