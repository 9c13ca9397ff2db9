"""`leaflens train` brings the prepared data up to date with its config first (the issue's
`leaflens train experiment=plantvillage_mini data.source=<folder>`), and leaves current or hand-made data alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from conftest import FAST_TRAIN, SAMPLE_DIR, compose, data_overrides
from leaflens.cli import app
from leaflens.data.prepare import changed_settings, preparation_settings, recorded_settings
from leaflens.pipeline import prepare_for_training


def _split_counts(processed: Path) -> dict[str, int]:
    return pd.read_csv(processed / "manifest.csv")["split"].value_counts().to_dict()


def test_prepared_data_follows_the_experiments_split_and_is_left_alone_when_current(tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    quickstart = compose(*data_overrides(tmp_path), "experiment=quickstart", task_name="train")
    recipe = compose(*data_overrides(tmp_path), "experiment=plantvillage_mini", task_name="train")
    assert (quickstart.data.split.test, recipe.data.split.test) == (0.15, 0.05)

    # Nothing there yet: the raw dir is fetched from data.source and prepared, and the settings recorded.
    assert prepare_for_training(quickstart, fetch=False) == processed
    assert recorded_settings(processed) == preparation_settings(quickstart.data)
    first = _split_counts(processed)
    stamp = (processed / "manifest.csv").stat().st_mtime_ns

    # Current: not written again.
    prepare_for_training(quickstart, fetch=True)
    assert (processed / "manifest.csv").stat().st_mtime_ns == stamp

    # The recipe's own split differs only in the split. (On the sample's ~8 photos per class both fractions give
    # each class one test photo, so a larger test share shows the re-preparation.)
    assert changed_settings(recorded_settings(processed), recipe.data) == {
        "split": (dict(quickstart.data.split), dict(recipe.data.split))
    }
    larger_test = compose(*data_overrides(tmp_path), "experiment=plantvillage_mini", "data.split.test=0.4")
    prepare_for_training(larger_test, fetch=False)
    second = _split_counts(processed)
    assert json.loads((processed / "stats.json").read_text())["split_fractions"]["test"] == 0.4
    assert second["test"] > first["test"]
    assert sum(second.values()) == sum(first.values())


def test_a_new_source_is_fetched_and_prepared_but_hand_made_data_is_used_as_it_is(tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    cfg = compose(*data_overrides(tmp_path), "experiment=quickstart", task_name="train")
    prepare_for_training(cfg, fetch=False)

    # A hand-made prepared directory (no recorded settings) is trained on as it is, unless a source is named.
    stats = json.loads((processed / "stats.json").read_text())
    del stats["settings"]
    (processed / "stats.json").write_text(json.dumps(stats))
    stamp = (processed / "manifest.csv").stat().st_mtime_ns
    prepare_for_training(cfg, fetch=False)
    assert (processed / "manifest.csv").stat().st_mtime_ns == stamp

    # Another source with the same settings: fetched into the raw dir and prepared again.
    subset = tmp_path / "subset"
    for label in sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())[:3]:
        shutil.copytree(SAMPLE_DIR / label, subset / label)
    other = compose(*data_overrides(tmp_path, source=subset), "experiment=quickstart", task_name="train")
    prepare_for_training(other, fetch=True)
    labels = set(pd.read_csv(processed / "manifest.csv")["label"])
    assert labels == {p.name for p in subset.iterdir()}
    assert recorded_settings(processed) == preparation_settings(other.data)


def test_train_command_prepares_the_named_source_before_training(tmp_path: Path) -> None:
    overrides = [*data_overrides(tmp_path), *FAST_TRAIN, f"paths.output_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(app, ["train", *overrides])
    assert result.exit_code == 0, result.output
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    data = json.loads((run_dir / "data.json").read_text())
    assert Path(data["processed_dir"]) == tmp_path / "processed"
    assert recorded_settings(tmp_path / "processed") is not None
