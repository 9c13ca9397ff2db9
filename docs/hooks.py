"""mkdocs hooks: pages generated from the code at build time, so the reference can never drift from it.

* ``reference/cli.md``: ``--help`` of every ``leaflens`` command (typer's own output).
* ``reference/configuration.md``: the config groups, their options and the composed default tree.
* ``reference/http-api.md`` + ``openapi.json``: the service's OpenAPI schema (``create_app``), as tables.
* ``model-card.md``: ``models/package/MODEL_CARD.md`` when a package has been exported (``make pipeline``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def _cli_page() -> str:
    import typer
    from typer.testing import CliRunner

    from leaflens.cli import app

    runner = CliRunner()
    lines = [
        "# CLI reference",
        "",
        "Generated from the code (`leaflens <command> --help`). Every command takes trailing `key=value` "
        "overrides of the [configuration](configuration.md).",
        "",
    ]

    def walk(command: Any, path: list[str]) -> None:
        result = runner.invoke(
            app, [*path, "--help"], env={"COLUMNS": "110", "NO_COLOR": "1", "TERM": "dumb"}
        )
        if result.exit_code != 0:
            raise RuntimeError(f"leaflens {' '.join(path)} --help failed: {result.output}")
        title = " ".join(["leaflens", *path])
        lines.extend([f"## `{title}`", "", "```text", result.output.rstrip(), "```", ""])
        if hasattr(command, "commands"):  # a group (typer may vendor its own click)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return "\n".join(lines)


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _config_page() -> str:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from leaflens.config import config_dir

    root = config_dir()
    lines = [
        "# Configuration",
        "",
        "One [Hydra](https://hydra.cc) tree in `configs/`, composed by `leaflens.config.load_config` for "
        "every stage. Choose a group option with `group=option` (`peft=head`), set a value with `key=value` "
        "(`trainer.max_epochs=3`), on the command line, in `invoke --args` or in an experiment file.",
        "",
        "## Groups and options",
        "",
        "| group | option | what it is |",
        "|---|---|---|",
    ]
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            lines.append(f"| `{group.name}` | `{option.stem}` | {_first_comment(option)} |")
    GlobalHydra.instance().clear()
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = compose(config_name="config")
    defaults = (root / "config.yaml").read_text()
    lines += [
        "",
        "## `configs/config.yaml`",
        "",
        "```yaml",
        defaults.rstrip(),
        "```",
        "",
        "## The composed default tree",
        "",
        "Interpolations (`${...}`) are resolved when a stage loads the config.",
        "",
        "```yaml",
        OmegaConf.to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{name.lower()})"
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    return f"`{schema.get('type', 'object')}`"


def _openapi() -> dict[str, Any]:
    from leaflens.config import load_config
    from leaflens.serving.api import create_app
    from leaflens.serving.server import settings_from_config

    cfg = load_config([], task_name="docs")
    # The package is loaded only when the app starts; the schema needs none.
    return create_app(Path(cfg.paths.models_dir) / "package", settings_from_config(cfg.serve)).openapi()


def _api_page(schema: dict[str, Any]) -> str:
    info = schema["info"]
    lines = [
        "# HTTP API",
        "",
        f"{info.get('summary', '')} {info.get('description', '')}",
        "",
        "Generated from the service's OpenAPI schema ([`openapi.json`](../openapi.json)); a running server "
        "also serves it at `/openapi.json` with interactive docs at `/docs`. Start one with "
        "`leaflens serve package=models/package`.",
        "",
    ]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            lines += [f"## `{method.upper()} {path}`", "", f"**{op.get('summary', '')}**", ""]
            if op.get("description"):
                lines += [op["description"], ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for p in params:
                    lines.append(
                        f"| `{p['name']}` | {p['in']} | {_schema_name(p.get('schema', {}))} | "
                        f"{'yes' if p.get('required') else 'no'} | {p.get('description', '')} |"
                    )
                lines.append("")
            body = op.get("requestBody", {}).get("content", {})
            for content_type, content in body.items():
                lines += [f"Request body (`{content_type}`): {_schema_name(content.get('schema', {}))}", ""]
            lines += ["| status | meaning | body |", "|---|---|---|"]
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {})
                shape = ", ".join(f"{_schema_name(c.get('schema', {}))} (`{t}`)" for t, c in content.items())
                lines.append(f"| {status} | {response.get('description', '')} | {shape} |")
            lines.append("")
    lines += ["## Schemas", ""]
    for name, spec in schema.get("components", {}).get("schemas", {}).items():
        lines += [f"### {name}", ""]
        if spec.get("description"):
            lines += [spec["description"].strip(), ""]
        props = spec.get("properties", {})
        if props:
            required = set(spec.get("required", []))
            lines += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, prop in props.items():
                description = (prop.get("description") or prop.get("title") or "").replace("\n", " ")
                needed = "yes" if field in required else "no"
                lines.append(f"| `{field}` | {_schema_name(prop)} | {needed} | {description} |")
            lines.append("")
    return "\n".join(lines)


def _model_card_page() -> str:
    card = ROOT / "models" / "package" / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text()
        return (
            "!!! note\n    The card of the package in `models/package/` (written by `leaflens export`).\n\n"
            + text
        )
    return "\n".join(
        [
            "# Model card",
            "",
            "Every exported package carries its own `MODEL_CARD.md` (written by `leaflens export` from the "
            "package's metrics, calibration, parity check and class list). No package was exported when this "
            "site was built: run `make pipeline` and rebuild the docs to include the card of "
            "`models/package/` here.",
            "",
        ]
    )


def on_files(files: Files, config: Any) -> Files:
    schema = _openapi()
    pages = {
        "reference/cli.md": _cli_page(),
        "reference/configuration.md": _config_page(),
        "reference/http-api.md": _api_page(schema),
        "openapi.json": json.dumps(schema, indent=2),
        "model-card.md": _model_card_page(),
    }
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files
