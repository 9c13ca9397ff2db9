"""Compose the one Hydra config tree (``configs/``) for any stage.

Every entry point (CLI, API, tests, sweeps) goes through :func:`load_config`, so ``key=value`` overrides mean the
same thing everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_NAME = "config"


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``configs/config.yaml``.

    Falls back to the source checkout this package was installed from (editable installs), then to ``start``.
    """
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "configs" / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    source_checkout = Path(__file__).resolve().parents[2]
    if (source_checkout / "configs" / f"{CONFIG_NAME}.yaml").is_file():
        return source_checkout
    return start


def config_dir() -> Path:
    """Directory of the Hydra config tree: ``$LEAFLENS_CONFIG_DIR`` or ``<project root>/configs``."""
    env = os.environ.get("LEAFLENS_CONFIG_DIR")
    path = Path(env) if env else find_project_root() / "configs"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"No leaflens config tree at {path}. Run from the leaflens checkout, or set LEAFLENS_CONFIG_DIR "
            "to a directory containing config.yaml."
        )
    return path


def load_config(overrides: Sequence[str] = (), task_name: str | None = None) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra-style ``key=value`` overrides and resolve it once.

    Resolving once matters: ``paths.output_dir`` contains ``${now:...}`` and must not change between reads.

    Args:
        overrides: Hydra override strings, e.g. ``["peft=head", "trainer.max_epochs=1"]``.
        task_name: Stage name (``train``, ``evaluate``...), used in the default output directory.

    Returns:
        The fully resolved config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    os.environ.setdefault("PROJECT_ROOT", str(find_project_root()))
    overrides = list(overrides)
    if task_name is not None and not any(o.startswith("task_name=") for o in overrides):
        overrides.append(f"task_name={task_name}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write a resolved config as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
