"""The main job end to end through the CLI, as `make pipeline` runs it, on the real configs shrunk to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import FAST_TRAIN, data_overrides
from leaflens.cli import app
from leaflens.serving.package import load_package


@pytest.mark.slow
def test_pipeline_cli_produces_run_report_and_verified_package(tmp_path: Path) -> None:
    overrides = [
        *data_overrides(tmp_path / "data"),
        *FAST_TRAIN,
        f"paths.models_dir={tmp_path / 'models'}",
        f"paths.reports_dir={tmp_path / 'reports'}",
    ]
    result = CliRunner().invoke(app, ["pipeline", *overrides])
    assert result.exit_code == 0, result.output

    package = Path(result.stdout.strip().splitlines()[-1])
    assert package == tmp_path / "models" / "package"
    load_package(package)  # every checksum verifies

    (run_dir,) = (tmp_path / "models" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    (report_dir,) = (tmp_path / "reports").iterdir()
    assert report_dir.name == run_dir.name
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["top1"] <= metrics["test"]["top5"] <= 1.0
    assert metrics["test"]["images"] > 0
    assert (report_dir / "report.md").is_file()


def test_stage_commands_reject_arguments_that_are_not_overrides() -> None:
    result = CliRunner().invoke(app, ["train", "not-an-override"])
    assert result.exit_code != 0
    assert "key=value" in result.output


def test_data_commands_run_through_the_cli(tmp_path: Path) -> None:
    overrides = data_overrides(tmp_path)
    download = CliRunner().invoke(app, ["data", "download", *overrides])
    assert download.exit_code == 0, download.output
    assert Path(download.stdout.strip().splitlines()[-1]) == tmp_path / "raw"
    prepare = CliRunner().invoke(app, ["data", "prepare", *overrides])
    assert prepare.exit_code == 0, prepare.output
    classes = json.loads((tmp_path / "processed" / "classes.json").read_text())
    assert len(classes) == 38
