"""Training-speed variants measured with `leaflens profile`, all in one run (reports/profiling.md).

Usage: python scripts/profile_variants.py data.processed_dir=<prepared dir> [key=value ...] [--repeats N]
       [--env KEY=VALUE]... [--keep DIR]

``--env`` adds a variable to every variant (e.g. OMP_NUM_THREADS=1 on a machine shared with other jobs);
``--keep`` keeps each variant's profile directory (summary.md, trace.json) under DIR.

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
# name -> (extra overrides, extra environment); all but the first run with the Makefile's malloc env.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "glibc malloc defaults": ([], {}),
    "malloc env (Makefile)": ([], MALLOC),
    "malloc env, 1 torch thread": ([], {**MALLOC, "OMP_NUM_THREADS": "1"}),
    "malloc env, no channels_last": (["optim.channels_last=false"], MALLOC),
    "malloc env, trainer.deterministic=false": (["trainer.deterministic=false"], MALLOC),
}


def run_variant(overrides: list[str], extra_env: dict[str, str], out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC and k != "OMP_NUM_THREADS"}
    env |= COMMON_ENV | extra_env | {"WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "leaflens.cli", "--log-level", "WARNING", "profile", *overrides]
    subprocess.run([*command, f"paths.output_dir={out}"], check=True, env=env)
    return json.loads((out / "profile.json").read_text())


COMMON_ENV: dict[str, str] = {}


def _options(argv: list[str]) -> tuple[list[str], int, Path | None]:
    repeats, keep, rest = 1, None, []
    args = iter(argv)
    for arg in args:
        if arg == "--repeats":
            repeats = int(next(args))
        elif arg == "--keep":
            keep = Path(next(args))
        elif arg == "--env":
            key, value = next(args).split("=", 1)
            COMMON_ENV[key] = value
        else:
            rest.append(arg)
    return rest, repeats, keep


def main(argv: list[str]) -> None:
    argv, repeats, keep = _options(argv)
    steps = ["profile.warmup_steps=2", "profile.active_steps=4", "profile.data_batches=5"]
    base = ["experiment=plantvillage_mini", *steps, *argv]
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = keep or Path(scratch)
        for repeat in range(repeats):
            for i, (name, (extra, extra_env)) in enumerate(VARIANTS.items()):
                out = Path(tmp) / f"{repeat}-{i}"
                results[name].append(run_variant([*base, *extra], extra_env, out))
                print(f"[{repeat + 1}/{repeats}] {name}: {results[name][-1]['training']['img_per_s']} img/s")
    first = next(iter(results.values()))[0]
    print(
        f"\nmodel {first['model']}, strategy {first['strategy']}, batch {first['batch_size']}, "
        f"median of {repeats} run(s); overrides: {' '.join(base)}; env: {COMMON_ENV or 'as is'}\n"
    )
    print(
        "| variant | threads | train img/s | compute ms/step | data wait ms/step | data wait share "
        "| vs Makefile env |"
    )
    print("|---|---|---|---|---|---|---|")
    reference = statistics.median(r["training"]["img_per_s"] for r in results["malloc env (Makefile)"])
    for name, runs in results.items():
        med = {
            k: statistics.median(r["training"][k] for r in runs)
            for k in ("img_per_s", "step_ms", "data_wait_ms")
        }
        share = statistics.median(r["training"]["data_wait_share"] for r in runs)
        print(
            f"| {name} | {runs[0]['threads']} | {med['img_per_s']:.1f} | {med['step_ms']:.0f} "
            f"| {med['data_wait_ms']:.0f} | "
            f"{100 * share:.0f} % | {med['img_per_s'] / reference:.2f}x |"
        )
    data = statistics.median(r["data"]["img_per_s"] for r in results["malloc env (Makefile)"])
    print(f"\nData pipeline alone (one process, decode + augment + collate): {data:.0f} img/s")


if __name__ == "__main__":
    main(sys.argv[1:])
