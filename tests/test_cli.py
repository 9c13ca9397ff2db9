"""Every command of the ``leaflens`` CLI explains itself."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from leaflens.cli import app

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
