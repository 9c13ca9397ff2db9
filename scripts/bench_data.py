"""Benchmark the data stage: `data prepare` throughput and the DataModule's train-loader throughput.

Usage: python scripts/bench_data.py [PATH] [key=value ...]
PATH defaults to ../shared/data/plantvillage-mini (relative to the repository); trailing key=value pairs
override the config (e.g. data.loader.batch_size=64). Prints the numbers and rewrites the `## Data` section of
reports/benchmarks.md. Everything is measured in this one run, on this machine, so compare the ratios.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "plantvillage-mini"
REPORT = REPO / "reports" / "benchmarks.md"
SECTION = "## Data"


def _loader_throughput(dm, epochs: int) -> tuple[float, float]:
    """(images/s of the first epoch incl. worker start-up, images/s of the later epochs)."""
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for images, _labels in dm.train_dataloader():
            seen += len(dm.normalize(images))  # what a training step receives
        rates.append(seen / (time.perf_counter() - start))
    later = rates[1:] or rates
    return rates[0], sum(later) / len(later)


def write_section(body: str, report: Path = REPORT) -> None:
    """Replace (or append) the `## Data` section of the benchmarks report, leaving other sections alone."""
    text = report.read_text() if report.is_file() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "\n".join([*lines[:start], body.rstrip("\n"), "", *lines[end:]]).rstrip("\n") + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


def main(argv: list[str]) -> int:
    os.environ.setdefault("PROJECT_ROOT", str(REPO))
    from timm.data import resolve_data_config

    from leaflens.config import load_config
    from leaflens.data.datamodule import PlantVillageDataModule
    from leaflens.data.download import download
    from leaflens.data.prepare import prepare
    from leaflens.data.taxonomy import load_classes
    from leaflens.logs import setup_logging
    from leaflens.train.checkpoint import create_backbone

    setup_logging("WARNING")
    paths = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    source = Path(paths[0]) if paths else DEFAULT_SOURCE
    if not source.is_absolute():
        source = (REPO / source).resolve()
    with tempfile.TemporaryDirectory(prefix="leaflens-bench-") as tmp:
        cfg = load_config(
            [
                f"data.source={source}",
                f"data.raw_dir={tmp}/raw",
                f"data.processed_dir={tmp}/processed",
                *overrides,
            ],
            task_name="data",
        )
        start = time.perf_counter()
        download(cfg)
        download_s = time.perf_counter() - start
        start = time.perf_counter()
        processed = prepare(cfg)
        prepare_s = time.perf_counter() - start
        stats = json.loads((processed / "stats.json").read_text())
        files = stats["files_scanned"]

        # The configured model's preprocessing (its pretrained_cfg_overlay included, e.g. the recipe's eval
        # crop_pct); its weights play no part, so none are loaded.
        model = create_backbone(
            cfg, len(load_classes(processed)), pretrained=False, pretrained_file=None, checkpoint_follows=True
        )
        data_config = resolve_data_config({}, model=model)
        loader = cfg.data.loader
        rows = []
        for label, workers, memory in (
            ("main process, decode each epoch", 0, False),
            (f"{loader.num_workers} workers, decode each epoch", int(loader.num_workers), False),
            (f"{loader.num_workers} workers, in-memory uint8 cache", int(loader.num_workers), True),
        ):
            dm = PlantVillageDataModule(
                processed,
                data_config,
                batch_size=int(loader.batch_size),
                num_workers=workers,
                persistent_workers=workers > 0,
                augment=dict(cfg.data.augment),
                memory_cache=memory,
            )
            start = time.perf_counter()
            dm.setup("fit")
            setup_s = time.perf_counter() - start
            first, steady = _loader_throughput(dm, epochs=2)
            rows.append((label, setup_s, first, steady))
            print(
                f"train loader [{label}]: setup {setup_s:.1f} s, "
                f"epoch 1 {first:.0f} img/s, epoch 2 {steady:.0f} img/s"
            )

    load = os.getloadavg()[0]
    dedup = stats["dedup"]
    print(f"data prepare: {files} files in {prepare_s:.1f} s = {files / prepare_s:.0f} images/s")
    body = [
        SECTION,
        "",
        f"`python scripts/bench_data.py` on `{source.name}` ({files} files, {stats['images']} kept), "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (the machine is shared: compare ratios).",
        f"Model input from `{cfg.model.name}`: {tuple(data_config['input_size'])}, "
        f"{data_config['interpolation']}; batch size {loader.batch_size}; "
        f"train split {stats['splits']['train']} images.",
        "",
        "| step | result |",
        "|---|---|",
        f"| data download (local copy) | {download_s:.1f} s |",
        f"| data prepare (decode, hash, pHash, dedup, split) | {prepare_s:.1f} s = "
        f"**{files / prepare_s:.0f} images/s** |",
    ]
    for label, setup_s, first, steady in rows:
        body.append(
            f"| train loader, {label} | setup {setup_s:.1f} s; epoch 1 {first:.0f} img/s, "
            f"epoch 2 **{steady:.0f} img/s** |"
        )
    body += [
        "",
        f"Duplicates and leaf groups: {dedup['exact_duplicates_removed']} exact copies removed, "
        f"{dedup['conflicting_label_images']} images with conflicting labels rejected, "
        f"{dedup['near_duplicate_pairs']} near-duplicate pairs (pHash ≤ {dedup['phash_distance']} bits) over "
        f"{dedup['near_duplicate_images']} images, "
        f"{dedup['series_grouped_images']} images in photo-series runs "
        f"(window {dedup['series_window']}); {dedup['groups']} leaf groups, "
        f"{dedup['groups_with_several_images']} with several images, largest {dedup['largest_group']}. "
        f"Rejected: {stats['rejected']['by_reason'] or 'none'}.",
    ]
    write_section("\n".join(body))
    print(f"wrote the {SECTION!r} section of {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
