"""The ``leaflens`` command line: one sub-command per stage; trailing ``key=value`` arguments override the config.

Stages are imported inside each command so that ``leaflens --help`` is instant and ``leaflens serve`` never
imports the training stack.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from leaflens.config import load_config
from leaflens.logs import logger, setup_logging

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
_OVERRIDES_HELP = (
    "Trailing key=value pairs override configs/ (Hydra syntax), e.g. peft=head trainer.max_epochs=3."
)

app = typer.Typer(
    name="leaflens",
    help="Diagnose plant diseases from leaf photos: data -> train -> evaluate -> export -> predict/serve.\n\n"
    + _OVERRIDES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Fetch and prepare the PlantVillage images.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    setup_logging(log_level)


def _config(ctx: typer.Context, task_name: str, extra: list[str] | None = None):
    """Compose the config from the command's trailing ``key=value`` arguments."""
    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        raise typer.BadParameter(f"expected key=value overrides, got {bad}")
    return load_config([*ctx.args, *(extra or [])], task_name=task_name)


@data_app.command("download", context_settings=_EXTRA)
def data_download(ctx: typer.Context) -> None:
    """Fetch raw images into data.raw_dir from data.source (folder, .zip, http(s) URL or kaggle:owner/name).

    Idempotent: a second run with the same source does nothing.
    """
    from leaflens.data.download import download

    path = download(_config(ctx, "data"))
    typer.echo(path)


@data_app.command("prepare", context_settings=_EXTRA)
def data_prepare(ctx: typer.Context) -> None:
    """Validate, deduplicate, group by leaf and split data.raw_dir into data.processed_dir."""
    from leaflens.data.prepare import prepare

    path = prepare(_config(ctx, "data"))
    typer.echo(path)


@app.command(context_settings=_EXTRA)
def train(ctx: typer.Context) -> None:
    """Fine-tune the model (peft=head|bitfit|lora|last_k|full) and write a run directory to paths.output_dir.

    The data is brought up to date first: data.source, when given, is fetched; data.processed_dir is prepared
    again when it is missing or was prepared with other settings (e.g. an experiment's split).
    """
    from leaflens.pipeline import prepare_for_training
    from leaflens.train.run import train as run_train

    cfg = _config(ctx, "train")
    # Under DDP every process runs this command; only the job's first one may write the data, the others (started
    # by Lightning once it has, or by srun on other nodes) train on what is there.
    if _launch_rank() == 0:
        prepare_for_training(cfg, fetch=any(a.lstrip("+").startswith("data.source=") for a in ctx.args))
    typer.echo(run_train(cfg))


def _launch_rank() -> int:
    """This process's rank when a launcher started it (Lightning DDP, torchrun, SLURM); 0 otherwise."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return max(int(os.environ.get(name) or 0) for name in names)


@app.command(context_settings=_EXTRA)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate run=<dir> on its test split (or data.source=<folder>): metrics, figures, calibration, report."""
    from leaflens.evaluate.run import evaluate as run_evaluate

    typer.echo(run_evaluate(_config(ctx, "evaluate")))


@app.command(context_settings=_EXTRA)
def export(
    ctx: typer.Context,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write a static int8 model (export.int8=true).")
    ] = False,
) -> None:
    """Export run=<dir> as a self-contained model package (ONNX, labels, preprocessing, calibration, card)."""
    from leaflens.export.run import export as run_export

    typer.echo(run_export(_config(ctx, "export", ["export.int8=true"] if int8 else [])))


@app.command(context_settings=_EXTRA)
def predict(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
) -> None:
    """Diagnose images: leaflens predict PATH... package=<dir> (or run=<dir>). Files, folders and globs.

    Exit status 1 when any input could not be read (the others are still reported).
    """
    from leaflens.predict import predict as run_predict

    paths = [a for a in ctx.args if "=" not in a]
    overrides = [a for a in ctx.args if "=" in a]
    if not paths:
        raise typer.BadParameter("give at least one image, folder or glob")
    cfg = load_config(overrides, task_name="predict")
    fmt = "json" if json_out else "csv" if csv_out else "table"
    raise typer.Exit(run_predict(paths, cfg, fmt))


@app.command(context_settings=_EXTRA)
def serve(ctx: typer.Context) -> None:
    """Serve package=<dir> over HTTP (FastAPI + uvicorn): web page at /, API under /v1, metrics at /metrics."""
    from leaflens.serving.server import serve as run_serve

    run_serve(_config(ctx, "serve"))


@app.command(context_settings=_EXTRA)
def sweep(ctx: typer.Context) -> None:
    """Optuna hyperparameter search over configs/hparams_search (resumable; SQLite by default)."""
    from leaflens.ops.sweep import sweep as run_sweep

    typer.echo(run_sweep(_config(ctx, "sweep")))


@app.command(context_settings=_EXTRA)
def profile(ctx: typer.Context) -> None:
    """Profile the data pipeline and training steps; writes a trace and a readable summary."""
    from leaflens.ops.profile import profile as run_profile

    typer.echo(run_profile(_config(ctx, "profile")))


@app.command(context_settings=_EXTRA)
def drift(ctx: typer.Context) -> None:
    """Compare what the service has seen with the training reference of package=<dir>; writes a report."""
    from leaflens.ops.drift import drift as run_drift

    typer.echo(run_drift(_config(ctx, "drift")))


@app.command(context_settings=_EXTRA)
def pipeline(ctx: typer.Context) -> None:
    """The main job: download -> prepare -> train -> evaluate -> export, on data.source (default: bundled sample)."""
    from leaflens.pipeline import run_pipeline

    package = run_pipeline(list(ctx.args))
    logger.info("Done. Serve it with: leaflens serve package={}", package)
    typer.echo(Path(package))


# The commands that train: they run several times faster with leaflens.malloc's settings.
_TRAINING_COMMANDS = {"train", "pipeline", "sweep"}


def main() -> None:
    """The ``leaflens`` console script: ``app``, re-executed first with the malloc settings when it trains."""
    if _TRAINING_COMMANDS & set(sys.argv[1:]):
        from leaflens.malloc import reexec_with_malloc_env

        # ``python -m leaflens.cli`` and the console script both become ``python -m leaflens.cli ...``.
        reexec_with_malloc_env(["-m", "leaflens.cli", *sys.argv[1:]])
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
