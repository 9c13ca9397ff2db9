"""``leaflens predict``: folders with bad files still give the good results, and the exit status says so."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE_DIR, compose
from leaflens.predict import predict


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    leaves = sorted((SAMPLE_DIR / "Tomato___healthy").iterdir())[:2]
    for leaf in leaves:
        shutil.copy(leaf, folder / leaf.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(leaves[0].read_bytes()[:500])
    (folder / ".hidden.jpg").write_text("skipped: hidden")
    return folder


def _cfg(model_package: Path):
    return compose(f"package={model_package}", "predict.top_k=2", task_name="predict")


def test_folder_with_bad_files_returns_good_results_and_status_1(
    mixed_folder: Path, model_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = predict([str(mixed_folder)], _cfg(model_package), "json")
    records = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert status == 1
    assert set(records) == {p.name for p in mixed_folder.iterdir() if not p.name.startswith(".")}
    good = [r for r in records.values() if r["ok"]]
    assert len(good) == 2
    for record in good:
        assert (
            len(record["top_k"]) == 2
            and record["crop"]
            and record["disease"]
            and 0 < record["confidence"] <= 1
        )
        assert isinstance(record["not_sure"], bool)
    assert records["notes.txt"]["reason"] == "not_an_image"
    assert records["empty.jpg"]["reason"] == "empty"  # a 0-byte file on disk
    assert records["truncated.jpg"]["reason"] == "corrupt"


def test_all_good_inputs_return_0_and_csv_and_table_render(
    model_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = str(SAMPLE_DIR / "Apple___healthy" / "*")
    assert predict([pattern], _cfg(model_package), "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(list((SAMPLE_DIR / "Apple___healthy").iterdir()))
    assert all(
        r["status"] == "ok" and r["label"] and r["label_2"] and float(r["probability"]) > 0 for r in rows
    )
    assert predict([pattern], _cfg(model_package), "table") == 0
    assert "leaflens diagnosis" in capsys.readouterr().out


def test_missing_path_is_reported(model_package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict(["/no/such/leaf.jpg"], _cfg(model_package), "json") == 1
    (record,) = json.loads(capsys.readouterr().out)
    assert record == {
        "file": "/no/such/leaf.jpg",
        "ok": False,
        "error": "no such file or directory",
        "reason": "not_found",
    }
