"""Profile: a real (shrunk) profile of data pipeline and training steps writes a trace and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST_TRAIN, compose, data_overrides
from leaflens.ops.profile import profile


@pytest.mark.slow
def test_profile_writes_trace_and_summary(prepared_root: Path, tmp_path: Path) -> None:
    cfg = compose(
        *data_overrides(prepared_root),
        *FAST_TRAIN,
        "profile.warmup_steps=1",
        "profile.active_steps=2",
        "profile.data_batches=2",
        f"paths.output_dir={tmp_path}",
        task_name="profile",
    )
    out = profile(cfg)
    result = json.loads((out / "profile.json").read_text())
    training, data = result["training"], result["data"]
    assert training["steps_timed"] == 2 and training["step_ms"] > 0 and training["img_per_s"] > 0
    assert 0.0 <= training["data_wait_share"] <= 1.0
    assert data["batches"] == 2 and data["images"] == 32 and data["img_per_s"] > 0
    assert "__getitem__" in data["call_tree"]  # the dataset's work shows up in the call tree
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("conv" in n for n in names)  # the torch trace holds the convolutions of the traced steps
    summary = (out / "summary.md").read_text()
    assert "img/s" in summary and "Self CPU" in summary
    assert (out / "data_pipeline.html").stat().st_size > 1000
    assert not (out / "run" / "metrics.json").exists() or result["training"]["steps_timed"] == 2


def test_profile_needs_prepared_data(tmp_path: Path) -> None:
    cfg = compose(
        f"data.processed_dir={tmp_path}/none", f"paths.output_dir={tmp_path}/out", task_name="profile"
    )
    with pytest.raises(FileNotFoundError, match="data prepare"):
        profile(cfg)
