"""The main job: download -> prepare -> train -> evaluate -> export, each stage composed from the same overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from leaflens.config import load_config
from leaflens.logs import logger


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
