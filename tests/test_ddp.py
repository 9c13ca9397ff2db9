"""trainer=ddp: Lightning DDP with 2 CPU processes (gloo) through the real CLI, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_TRAIN, REPO, data_overrides


@pytest.mark.slow
def test_ddp_two_cpu_processes(prepared_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    leaflens = Path(sys.executable).with_name("leaflens")
    command = [
        str(leaflens),
        "train",
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.output_dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # Each process took the same 2 optimizer steps on its half of every batch stream.
    assert metrics["global_step"] == 2 and metrics["train_images"] == 2 * 2 * 16
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert not list(run_dir.parent.glob("*/ddp")), "another process wrote a second run directory"
