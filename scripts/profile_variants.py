"""Training-speed variants measured with `leaflens profile`, all in one run (reports/profiling.md).

Usage: python scripts/profile_variants.py data.processed_dir=<prepared dir> [key=value ...] [--repeats N]

Each variant is a fresh `leaflens profile` process (so malloc settings, which glibc reads at start-up, apply),
with the same trailing overrides plus its own; the variants run interleaved `--repeats` times and the table
shows the median. Prints a markdown table of training img/s, compute ms per step and the share of time spent
waiting for batches.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
# name -> (extra overrides, malloc tuned?)
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "glibc malloc defaults": ([], False),
    "malloc env (Makefile)": ([], True),
    "malloc env, no channels_last": (["optim.channels_last=false"], True),
    "malloc env, no memory cache": (["data.loader.memory_cache=false"], True),
    "malloc env, 0 loader workers": (["data.loader.num_workers=0"], True),
}


def run_variant(overrides: list[str], malloc: bool, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC}
    if malloc:
        env |= MALLOC
    env["WANDB_MODE"] = "offline"
    command = [sys.executable, "-m", "leaflens.cli", "--log-level", "WARNING", "profile", *overrides]
    subprocess.run([*command, f"paths.output_dir={out}"], check=True, env=env)
    return json.loads((out / "profile.json").read_text())


def main(argv: list[str]) -> None:
    repeats = 1
    if "--repeats" in argv:
        index = argv.index("--repeats")
        repeats = int(argv[index + 1])
        argv = argv[:index] + argv[index + 2 :]
    base = ["experiment=plantvillage_mini", "profile.warmup_steps=3", "profile.active_steps=10", *argv]
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for i, (name, (extra, malloc)) in enumerate(VARIANTS.items()):
                out = Path(tmp) / f"{repeat}-{i}"
                results[name].append(run_variant([*base, *extra], malloc, out))
                print(f"[{repeat + 1}/{repeats}] {name}: {results[name][-1]['training']['img_per_s']} img/s")
    first = next(iter(results.values()))[0]
    print(
        f"\nmodel {first['model']}, strategy {first['strategy']}, batch {first['batch_size']}, "
        f"{first['threads']} torch threads; median of {repeats} run(s); overrides: {' '.join(base)}\n"
    )
    print(
        "| variant | train img/s | compute ms/step | data wait ms/step | data wait share | vs Makefile env |"
    )
    print("|---|---|---|---|---|---|")
    reference = statistics.median(r["training"]["img_per_s"] for r in results["malloc env (Makefile)"])
    for name, runs in results.items():
        med = {
            k: statistics.median(r["training"][k] for r in runs)
            for k in ("img_per_s", "step_ms", "data_wait_ms")
        }
        share = statistics.median(r["training"]["data_wait_share"] for r in runs)
        print(
            f"| {name} | {med['img_per_s']:.1f} | {med['step_ms']:.0f} | {med['data_wait_ms']:.0f} | "
            f"{100 * share:.0f} % | {med['img_per_s'] / reference:.2f}x |"
        )
    data = statistics.median(r["data"]["img_per_s"] for r in results["malloc env (Makefile)"])
    print(f"\nData pipeline alone (one process, decode + augment + collate): {data:.0f} img/s")


if __name__ == "__main__":
    main(sys.argv[1:])
