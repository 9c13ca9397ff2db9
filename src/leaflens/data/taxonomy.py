"""The PlantVillage class taxonomy as data: ``classes.json`` records built from ``data.taxonomy``.

Class names follow PlantVillage's ``Crop___Disease`` folder names; crop, disease, healthy flag and display
name are derived from the name, so the list is typed once (in the config) and read from ``classes.json``
everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from leaflens.logs import logger

CLASSES_FILE = "classes.json"
SEPARATOR = "___"


def _humanise(part: str) -> str:
    # "Cherry_(including_sour)" -> "Cherry (including sour)", "Common_rust_" -> "Common rust".
    return " ".join(part.replace("_", " ").split())


def describe_class(name: str) -> dict[str, Any]:
    """Crop, disease, healthy flag and display name of a ``Crop___Disease`` class name."""
    crop, sep, disease = name.partition(SEPARATOR)
    if not sep:
        crop, disease = name, "unknown"
    crop_h, disease_h = _humanise(crop), _humanise(disease)
    healthy = disease_h.lower() == "healthy"
    return {
        "name": name,
        "crop": crop_h,
        "disease": disease_h,
        "healthy": healthy,
        "display_name": f"{crop_h} — {disease_h}",
    }


def build_classes(
    taxonomy: Sequence[str], counts: Mapping[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """``classes.json`` records: every taxonomy class in taxonomy order, then classes found outside it.

    Args:
        taxonomy: The declared class names (``data.taxonomy``).
        counts: Number of usable images per class name found in the data.

    Returns:
        The records (``id`` = index) and the sorted names of classes that were not in the taxonomy.
    """
    names = list(dict.fromkeys(taxonomy))
    if len(names) != len(taxonomy):
        raise ValueError("data.taxonomy lists a class more than once")
    extra = sorted(set(counts) - set(names))
    if extra:
        logger.warning("{} class folder(s) outside data.taxonomy, appended: {}", len(extra), extra)
    records = []
    for index, name in enumerate([*names, *extra]):
        records.append({"id": index, **describe_class(name), "count": int(counts.get(name, 0))})
    return records, extra


def write_classes(records: Sequence[Mapping[str, Any]], processed_dir: Path) -> Path:
    """Write ``classes.json`` into ``processed_dir``."""
    path = Path(processed_dir) / CLASSES_FILE
    path.write_text(json.dumps(list(records), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_classes(processed_dir: str | Path) -> list[dict[str, Any]]:
    """The class records of a prepared dataset, in label-id order."""
    path = Path(processed_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `leaflens data prepare` first (data.processed_dir)")
    records = json.loads(path.read_text(encoding="utf-8"))
    if [r["id"] for r in records] != list(range(len(records))):
        raise ValueError(f"{path}: class ids must be 0..{len(records) - 1} in order")
    return records
