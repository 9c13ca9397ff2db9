"""Shared fixtures: the real config tree shrunk to seconds, and the artefacts each stage hands to the next.

The chain sample -> processed -> trained run -> package is built once per test session and shared across
pytest-xdist workers through a file lock (each stage is only a few seconds on the bundled sample).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from omegaconf import DictConfig

from leaflens.config import load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "sample"
SHARED_MINI = REPO.parent / "shared" / "data" / "plantvillage-mini"

os.environ.setdefault("PROJECT_ROOT", str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")

# Shrinks the real training config to a few seconds on 2 CPU cores.
FAST_TRAIN = [
    "experiment=quickstart",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "data.loader.batch_size=16",
    "data.loader.num_workers=0",
]


def data_overrides(root: Path, source: Path = SAMPLE_DIR) -> list[str]:
    """Overrides that point every data path of the config under ``root``."""
    return [
        f"data.source={source}",
        f"data.raw_dir={root}/raw",
        f"data.processed_dir={root}/processed",
    ]


def compose(*overrides: str, task_name: str = "test") -> DictConfig:
    """The real config with the given overrides."""
    return load_config(list(overrides), task_name=task_name)


def _shared_artifact(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]
) -> Path:
    """Build ``name`` once for all xdist workers: the first one builds, the others wait and reuse."""
    # Under xdist each worker's basetemp sits inside this session's directory; without xdist the parent would be
    # shared by every past session, so stay inside basetemp then.
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "leaflens-shared"
    root.mkdir(parents=True, exist_ok=True)
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if done.is_file():
            return Path(json.loads(done.read_text())["path"])
        path = build(root / name)
        done.write_text(json.dumps({"path": str(path)}))
        return path


@pytest.fixture(scope="session")
def data_config() -> dict:
    """timm's resolved data config of the configured backbone (metadata only: no weights needed)."""
    import timm
    from timm.data import resolve_data_config

    cfg = compose(task_name="data")
    return resolve_data_config({}, model=timm.create_model(cfg.model.name, pretrained=False))


@pytest.fixture(scope="session")
def augment() -> dict:
    """The configured training augmentation."""
    return dict(compose(task_name="data").data.augment)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose ``raw/`` and ``processed/`` hold the bundled sample, downloaded and prepared."""

    def build(root: Path) -> Path:
        from leaflens.data.download import download
        from leaflens.data.prepare import prepare

        cfg = compose(*data_overrides(root), task_name="data")
        download(cfg)
        prepare(cfg)
        return root

    return _shared_artifact(tmp_path_factory, "prepared", build)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, prepared_root: Path) -> Path:
    """A run directory trained for a few batches with the real quickstart experiment."""

    def build(root: Path) -> Path:
        from leaflens.train.run import train

        cfg = compose(
            *data_overrides(prepared_root), *FAST_TRAIN, f"paths.output_dir={root}", task_name="train"
        )
        return train(cfg)

    return _shared_artifact(tmp_path_factory, "run", build)


@pytest.fixture(scope="session")
def model_package(tmp_path_factory: pytest.TempPathFactory, prepared_root: Path, trained_run: Path) -> Path:
    """The model package exported from ``trained_run``."""

    def build(root: Path) -> Path:
        from leaflens.export.run import export

        cfg = compose(
            *data_overrides(prepared_root),
            f"run={trained_run}",
            f"paths.output_dir={root}",
            task_name="export",
        )
        return export(cfg)

    return _shared_artifact(tmp_path_factory, "package", build)
