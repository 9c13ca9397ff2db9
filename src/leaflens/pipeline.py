"""The main job: download -> prepare -> train -> evaluate -> export, each stage composed from the same overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from leaflens.config import load_config
from leaflens.logs import logger


def prepare_for_training(cfg: DictConfig, fetch: bool) -> Path:
    """Bring ``data.processed_dir`` up to date with the config before a run trains on it; returns it.

    ``data.source`` is fetched when ``fetch`` is set (the user named it) or ``data.raw_dir`` does not exist yet;
    the data is prepared again when the fetch brought other images, or when the prepared directory is missing or
    was prepared with other settings (e.g. an experiment's own split fractions), and left alone otherwise. A
    prepared directory that records no settings (made by hand) is used as it is unless ``fetch`` is set.
    """
    from leaflens.data.download import download, read_marker
    from leaflens.data.prepare import changed_settings, prepare, recorded_settings

    data = cfg.data
    processed_dir = Path(data.processed_dir)
    recorded = recorded_settings(processed_dir)
    if recorded == {} and not fetch:
        logger.warning(
            "{} records no preparation settings (prepared by hand or by an older leaflens): training on it as "
            "it is; `leaflens data prepare` with this run's overrides prepares it again",
            processed_dir,
        )
        return processed_dir
    fetched = False
    if fetch or not Path(data.raw_dir).is_dir():
        before = read_marker(data.raw_dir)
        download(cfg)
        fetched = read_marker(data.raw_dir) != before
    if recorded is None:
        reason = "nothing is prepared there yet"
    elif fetched:
        reason = f"{data.raw_dir} now holds {data.source}"
    elif not recorded:
        reason = "it records no preparation settings"
    else:
        changed = changed_settings(recorded, data)
        if not changed:
            logger.info("{} is up to date with the config; not preparing it again", processed_dir)
            return processed_dir
        # The taxonomy is a list of 38 names: name it rather than print both.
        reason = "it was prepared with other settings: " + "; ".join(
            "taxonomy changed" if key == "taxonomy" else f"{key} {old} -> {new}"
            for key, (old, new) in changed.items()
        )
    logger.info("Preparing {} ({})", processed_dir, reason)
    return prepare(cfg)


def run_pipeline(overrides: Sequence[str] = ()) -> Path:
    """Run every stage on ``data.source`` and return the exported model package directory.

    The run directory lands in ``paths.models_dir/runs/<time>``, the evaluation report in
    ``paths.reports_dir/<run name>`` and the package in ``paths.models_dir/package``.
    """
    from leaflens.data.download import download
    from leaflens.data.prepare import prepare
    from leaflens.evaluate.run import evaluate
    from leaflens.export.run import export
    from leaflens.train.run import train

    overrides = list(overrides)
    data_cfg = load_config(overrides, task_name="data")
    download(data_cfg)
    prepare(data_cfg)

    base = load_config(overrides, task_name="train")
    run_name = Path(base.paths.output_dir).name
    run_dir = train(
        load_config([*overrides, f"paths.output_dir={base.paths.models_dir}/runs/{run_name}"], "train")
    )
    logger.info("Trained run: {}", run_dir)

    report = evaluate(
        load_config(
            [*overrides, f"run={run_dir}", f"paths.output_dir={base.paths.reports_dir}/{run_name}"],
            "evaluate",
        )
    )
    logger.info("Evaluation report: {}", report)

    package = export(
        load_config(
            [*overrides, f"run={run_dir}", f"paths.output_dir={base.paths.models_dir}/package"], "export"
        )
    )
    logger.info("Model package: {}", package)
    return package
