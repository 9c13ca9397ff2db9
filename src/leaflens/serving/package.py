"""A model package on disk: write its sha256 manifest, and load it only after every checksum matches.

A package is a plain directory (see docs/design.md, "Model package"). ``manifest.json`` lists the sha256 of
every file; :func:`load_package` refuses a package with a missing, extra-required, truncated or edited file
and names the file, so a half-copied or tampered model never serves predictions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaflens.logs import logger

MANIFEST = "manifest.json"
# Files without which the engine cannot run; the rest (int8 model, weights, card, reference...) are optional.
REQUIRED_FILES = ("model.onnx", "labels.json", "preprocess.json", "calibration.json", "model.json")
FORMAT_VERSION = 1


class PackageError(RuntimeError):
    """A model package that is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(package_dir: Path) -> Path:
    """Hash every file in ``package_dir`` (recursively, except the manifest) into ``manifest.json``.

    Call it last, after every other file of the package is written.
    """
    package_dir = Path(package_dir)
    files = {
        path.relative_to(package_dir).as_posix(): sha256_file(path)
        for path in sorted(package_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise PackageError(f"cannot write the manifest of {package_dir}: required files missing: {missing}")
    manifest = {"format_version": FORMAT_VERSION, "algorithm": "sha256", "files": files}
    path = package_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_package(package_dir: Path) -> dict[str, str]:
    """Check every file listed in the manifest; return the ``{name: sha256}`` map.

    Raises:
        PackageError: naming the first file that is missing, unlisted-but-required or whose hash differs.
    """
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(f"model package {package_dir} does not exist or is not a directory")
    manifest_path = package_dir / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(
            f"model package {package_dir} has no {MANIFEST}; it is incomplete or not a leaflens package "
            "(re-export it with `leaflens export run=<dir>`)"
        )
    try:
        files: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PackageError(f"{manifest_path} is not a valid manifest: {err}") from err
    for name in REQUIRED_FILES:
        if name not in files:
            raise PackageError(f"model package {package_dir}: required file {name} is not in {MANIFEST}")
    for name, expected in files.items():
        path = package_dir / name
        if not path.is_file():
            raise PackageError(f"model package {package_dir} is incomplete: file {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(
                f"model package {package_dir}: checksum mismatch for {name} (expected {expected[:12]}..., "
                f"got {actual[:12]}...); the file was modified or corrupted — re-export the package"
            )
    unlisted = sorted(
        p.relative_to(package_dir).as_posix()
        for p in package_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.relative_to(package_dir).as_posix() not in files
    )
    if unlisted:
        logger.warning("Model package {}: files not in the manifest are ignored: {}", package_dir, unlisted)
    return files


def _read_json(package_dir: Path, name: str, default: Any = None) -> Any:
    path = package_dir / name
    if not path.is_file():
        return default
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ModelPackage:
    """The verified contents of a package directory (JSON parts parsed; model files left as paths)."""

    dir: Path
    labels: list[dict[str, Any]]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    model_info: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    @property
    def abstain_threshold(self) -> float:
        return float(self.calibration.get("abstain", {}).get("threshold", 0.0))

    @property
    def has_int8(self) -> bool:
        return "model.int8.onnx" in self.files

    def model_path(self, variant: str = "fp32") -> Path:
        """Path of the ONNX model for ``variant`` (``fp32`` or ``int8``)."""
        if variant == "fp32":
            return self.dir / "model.onnx"
        if variant == "int8":
            if not self.has_int8:
                raise PackageError(f"model package {self.dir} has no int8 model (export it with --int8)")
            return self.dir / "model.int8.onnx"
        raise ValueError(f"unknown model variant {variant!r}; expected 'fp32' or 'int8'")


def load_package(package_dir: str | Path) -> ModelPackage:
    """Verify ``package_dir`` against its manifest and parse its JSON files.

    Raises:
        PackageError: if the package is missing, incomplete or tampered with (the message names the file).
    """
    package_dir = Path(package_dir).expanduser().resolve()
    files = verify_package(package_dir)
    labels = _read_json(package_dir, "labels.json")
    info = _read_json(package_dir, "model.json")
    if int(info.get("num_classes", len(labels))) != len(labels):
        raise PackageError(
            f"model package {package_dir}: model.json declares {info.get('num_classes')} classes but "
            f"labels.json has {len(labels)}"
        )
    return ModelPackage(
        dir=package_dir,
        labels=labels,
        preprocess=_read_json(package_dir, "preprocess.json"),
        calibration=_read_json(package_dir, "calibration.json"),
        model_info=info,
        metrics=_read_json(package_dir, "metrics.json", {}),
        files=files,
    )
