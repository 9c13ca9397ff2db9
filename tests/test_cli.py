"""Every command of the ``leaflens`` CLI explains itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from leaflens.cli import app
from leaflens.malloc import MALLOC_ENV

runner = CliRunner()


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        out.append((*prefix, name))
        if hasattr(command, "commands"):  # a group (typer may vendor its own click)
            out += _commands(command, (*prefix, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))


def test_top_level_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in (
        "data",
        "train",
        "evaluate",
        "export",
        "predict",
        "serve",
        "sweep",
        "profile",
        "drift",
        "pipeline",
    ):
        assert stage in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_bad_override_is_refused() -> None:
    result = runner.invoke(app, ["drift", "not-an-override"])
    assert result.exit_code != 0
    assert "key=value" in result.output


def test_drift_without_package_names_the_fix() -> None:
    result = runner.invoke(app, ["drift"])
    assert result.exit_code != 0
    assert "package=" in str(result.exception)


def _without_malloc_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    return {**env, **extra}


def test_training_commands_run_with_the_malloc_settings_and_keep_the_users() -> None:
    # A training command re-executes itself with every setting; one the user exported is kept.
    show = "import os; print(os.environ['MALLOC_TOP_PAD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"
    code = f"from leaflens.malloc import reexec_with_malloc_env; reexec_with_malloc_env(['-c', {show!r}])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=_without_malloc_env(MALLOC_TOP_PAD_="12345"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["12345", MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]]
    # The console script does so for `train` (here its help, which trains nothing) and stays a plain process for
    # the others.
    leaflens = Path(sys.executable).with_name("leaflens")
    for command, reexecs in ((["train", "--help"], True), (["predict", "--help"], False)):
        env = _without_malloc_env(PYTHONPROFILEIMPORTTIME="1")
        result = subprocess.run(
            [str(leaflens), *command], env=env, capture_output=True, text=True, check=True
        )
        # Python prints its import-time table once per process start: twice when the command re-executed.
        starts = result.stderr.count("import time: self [us]")
        assert starts == (2 if reexecs else 1), (command, starts)
