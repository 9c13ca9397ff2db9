"""Training throughput: end-to-end (data loader + Lightning + model) vs model-only steps on the same batches.

    python scripts/bench_train.py --processed data/processed [key=value ...]

Each round draws ``--warmup + --steps`` training batches from the real training config's loader (default
``experiment=plantvillage_mini``), times them through the LightningModule's loss + backward + optimizer step with
no loader (model-only), runs the real ``lightning.Trainer.fit`` for as many batches (end-to-end), and times the
model-only loop once more. The ratio divides end-to-end by the mean of the two model-only runs (target >= 0.9 on
CPU), so it is meaningful even on a noisy, shared machine whose speed drifts. ``--rounds`` repeats this, each
round in a fresh process as a real run is (one ``fit`` per process), and the median is reported. Prints the
numbers and writes the ``## Training`` section of ``reports/benchmarks.md``.
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

from leaflens.malloc import reexec_with_malloc_env

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
    """Wall time and images from the end of the warm-up batches to the last batch.

    It keeps no batch: holding every batch would make the loader write each one into freshly mapped memory
    (page faults a real run does not pay), so the model-only loop replays batches drawn beforehand.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seen = 0
        self.start = self.end = 0.0
        self.images = 0

    # type: ignore[no-untyped-def]
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        now = time.perf_counter()
        if batch_idx + 1 == self.warmup:
            self.start = now
        elif batch_idx + 1 > self.warmup:
            self.end = now
            self.images += int(batch[1].numel())


def draw_batches(dm: PlantVillageDataModule, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches as the training step receives them (loaded, augmented, normalised)."""
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(dm.on_after_batch_transfer(batch, 0))
        if len(batches) == count:
            return batches
    raise SystemExit(f"only {len(batches)} training batches available; lower --steps")


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
) -> dict[str, float]:
    """One round: model-only steps, ``warmup + steps`` batches through ``Trainer.fit``, model-only steps again.

    The model-only loop runs before and after the fit on the same batches, drawn from the training loader
    beforehand, and the ratio divides by the mean of the two: a machine whose speed drifts during the round
    moves both sides alike instead of favouring whichever loop ran second.

    Returns:
        End-to-end img/s, model-only img/s before and after, and the ratio.
    """
    batches = warmup + steps
    replay = draw_batches(dm, batches)
    before = model_only(module, replay, warmup)
    clock = BatchClock(warmup)
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
    if clock.seen < batches:
        raise SystemExit(f"only {clock.seen} training batches available; lower --steps")
    end_to_end = clock.images / (clock.end - clock.start)
    after = model_only(module, replay, warmup)
    return {
        "end_to_end": end_to_end,
        "model_before": before,
        "model_after": after,
        "ratio": end_to_end / statistics.mean([before, after]),
    }


def one_round(cfg: DictConfig, processed: Path, warmup: int, steps: int) -> dict:
    """One measured round on a freshly built module and DataModule (what a child process runs)."""
    L.seed_everything(cfg.seed)
    num_classes = len(load_classes(processed))
    net = create_backbone(cfg, num_classes)
    data_config = resolve_data_config({}, model=net)
    net = instantiate(cfg.peft)(net)
    # Both loops step full-size batches: with progressive resizing on, the fit's first epoch would train on
    # shrunk batches while the model-only loop does not, which flatters the ratio.
    cfg.data.augment.low_res_epochs = 0
    dm = datamodule_from_config(cfg.data, data_config)
    module = ClassifierModule(
        net,
        num_classes,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=None,
        freeze_bn_stats=cfg.model.freeze_bn_stats,
        channels_last=cfg.optim.channels_last,
    )
    return {**measure_round(module, dm, cfg, warmup, steps), "input_size": list(data_config["input_size"])}


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
        f"round: end-to-end {result['end_to_end']:.1f} img/s, model-only {result['model_before']:.1f} before / "
        f"{result['model_after']:.1f} after, ratio {result['ratio']:.2f}"
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
        "| model-only step img/s before / after the fit, batches drawn from the same loader "
        "(forward + backward + AdamW) "
        "| ratio to their mean |\n|---|---:|---:|---:|\n"
        + "".join(
            f"| {i} | {r['end_to_end']:.1f} | {r['model_before']:.1f} / {r['model_after']:.1f} | {r['ratio']:.2f} |\n"
            for i, r in enumerate(rounds, 1)
        )
        + f"\n**Median ratio end-to-end / model-only over {len(rounds)} rounds: {median:.2f}** (target >= 0.9).\n\n"
        "Each round is a fresh process that builds the module and the loaders, draws the replay batches from the "
        "training loader, times the model-only loop, trains through `Trainer.fit` (which keeps no batch) and times "
        "the model-only loop again, so the numbers of a round share the machine's state; the machine is shared, "
        "so absolute values move between rounds and runs, and the ratio is what this benchmark checks. "
        "The EMA of the weights (a callback of the real training run) is not part of either loop."
    )
    print(body)
    write_section(args.report, body)
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
