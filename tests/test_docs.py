"""The documentation site builds with ``mkdocs build --strict``, with its generated reference pages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed")  # fmt: skip
def test_docs_build_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("leaflens data download", "leaflens sweep", "leaflens drift", "leaflens serve"):
        assert command in cli
    schema = json.loads((site / "openapi.json").read_text())
    assert "/v1/predict" in schema["paths"]
    assert "/v1/predict" in (site / "reference" / "http-api" / "index.html").read_text()
    assert "hparams_search" in (site / "reference" / "configuration" / "index.html").read_text()
    assert 'class="mermaid"' in (site / "architecture" / "index.html").read_text()
    assert not (site / "hooks.py").exists()
