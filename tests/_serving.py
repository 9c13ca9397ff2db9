"""Service settings for the serving tests: the real ``serve`` config, with test-specific overrides."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from conftest import compose
from leaflens.serving.api import ServeSettings
from leaflens.serving.server import settings_from_config


@cache
def _configured() -> ServeSettings:
    return settings_from_config(compose(task_name="serve").serve)


def serve_settings(**overrides) -> ServeSettings:
    """``configs/serve`` as composed, without a summary store unless one is given, then ``overrides``."""
    return replace(_configured(), **{"summaries_path": None, **overrides})
