"""``leaflens predict PATH... package=<dir>``: diagnose image files, folders and globs from the terminal.

Output is a table (default), JSON or CSV on stdout; unreadable and non-image files are reported per file and
skipped, and the return value (the exit status) is 1 when any input failed. Imports no torch unless
``run=<dir>`` asks to predict straight from a training run.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from leaflens.logs import logger
from leaflens.serving.engine import InferenceEngine, Result

BATCH_SIZE = 32


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Result]]:
    """Files, folders (recursive, hidden files skipped) and glob patterns -> files, plus inputs matching
    nothing."""
    files: list[Path] = []
    missing: list[Result] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(
                sorted(
                    p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)
                )
            )
        elif path.exists():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if matches:
                files.extend(matches)
            else:
                missing.append(Result(source=item, error="no file matches this pattern", reason="not_found"))
        else:
            missing.append(Result(source=item, error="no such file or directory", reason="not_found"))
    return list(dict.fromkeys(files)), missing


def engine_from_config(cfg: DictConfig) -> InferenceEngine:
    """The engine for ``package=<dir>`` (ONNX Runtime) or ``run=<dir>`` (the run's PyTorch model)."""
    top_k = int(cfg.predict.top_k)
    if cfg.package:
        return InferenceEngine.from_package(cfg.package, top_k=top_k)
    if cfg.run:
        from leaflens.export.onnx import TorchRunner
        from leaflens.export.run import run_package
        from leaflens.train.checkpoint import load_run

        run_dir = Path(cfg.run).expanduser().resolve()
        loaded = load_run(run_dir)
        runner = TorchRunner(loaded.model, flips=loaded.test_time_flips)
        return InferenceEngine(run_package(run_dir, loaded), runner, top_k=top_k)
    raise ValueError("predict needs a model: package=<package dir> (from `leaflens export`) or run=<run dir>")


def result_record(result: Result) -> dict[str, Any]:
    """A JSON-able record of one input."""
    if result.prediction is None:
        return {"file": result.source, "ok": False, "error": result.error, "reason": result.reason}
    return {"file": result.source, "ok": True, **result.prediction.to_dict()}


def _csv(results: Sequence[Result], top_k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["file", "status", "label", "crop", "disease", "healthy", "probability", "not_sure"]
    for rank in range(2, top_k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    writer.writerow([*header, "error"])
    for result in results:
        if result.prediction is None:
            writer.writerow([result.source, "error", *[""] * (len(header) - 2), result.error])
            continue
        p = result.prediction
        row = [
            result.source,
            "ok",
            p.best.name,
            p.best.crop,
            p.best.disease,
            p.best.healthy,
            f"{p.confidence:.6f}",
            p.abstain,
        ]
        for rank in range(1, top_k):
            alt = p.top_k[rank] if rank < len(p.top_k) else None
            row += [alt.name, f"{alt.probability:.6f}"] if alt else ["", ""]
        writer.writerow([*row, ""])
    return buffer.getvalue()


def _table(results: Sequence[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="leaflens diagnosis", show_lines=False)
    for column in ("file", "crop", "diagnosis", "probability", "alternatives"):
        table.add_column(column, overflow="fold")
    for result in results:
        if result.prediction is None:
            table.add_row(result.source, "", f"[red]error ({result.reason})[/red]: {result.error}", "", "")
            continue
        p = result.prediction
        diagnosis = (
            p.best.disease if not p.abstain else f"[yellow]not sure[/yellow] (best guess: {p.best.disease})"
        )
        alternatives = ", ".join(f"{s.display_name} {s.probability:.1%}" for s in p.top_k[1:])
        table.add_row(result.source, p.best.crop, diagnosis, f"{p.confidence:.1%}", alternatives)
    Console().print(table)


def predict(paths: Sequence[str], cfg: DictConfig, fmt: str = "table") -> int:
    """Diagnose ``paths`` and print the results in ``fmt`` (``table``, ``json`` or ``csv``).

    Returns:
        0 when every input was diagnosed, 1 when any input could not be read (the others are still printed).
    """
    if fmt not in ("table", "json", "csv"):
        raise ValueError(f"unknown output format {fmt!r}; expected table, json or csv")
    engine = engine_from_config(cfg)
    files, results = expand_inputs(paths)
    batches = range(0, len(files), BATCH_SIZE)
    for start in tqdm(batches, desc="predict", unit="batch", disable=len(batches) < 3, file=sys.stderr):
        results.extend(engine.predict_paths(files[start : start + BATCH_SIZE]))
    failed = [r for r in results if r.prediction is None]
    for result in failed:
        logger.warning("{}: {} ({})", result.source, result.error, result.reason)
    if fmt == "json":
        sys.stdout.write(json.dumps([result_record(r) for r in results], indent=2, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        sys.stdout.write(_csv(results, engine.top_k))
    else:
        _table(results)
    if failed:
        logger.error("{} of {} input(s) could not be diagnosed", len(failed), len(results))
    return 1 if failed else 0
