"""One configured logger for the whole project (loguru), with a level from ``LEAFLENS_LOG_LEVEL``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loguru import logger

__all__ = ["add_file_sink", "logger", "setup_logging"]

_FORMAT = "<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | <cyan>{name}</cyan> - {message}"


def setup_logging(level: str | None = None) -> None:
    """(Re)configure the stderr sink. Safe to call more than once."""
    logger.remove()
    logger.add(sys.stderr, level=level or os.environ.get("LEAFLENS_LOG_LEVEL", "INFO"), format=_FORMAT)


def add_file_sink(path: Path) -> int:
    """Also log to ``path`` (e.g. a run directory's ``run.log``); returns the sink id for ``logger.remove``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logger.add(path, level="DEBUG", enqueue=False)
