"""Inference throughput of one trained run: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (static
QDQ), batch 1 and 32, all measured in one process, plus the int8 accuracy drop on the held-out images.

    python scripts/bench_inference.py run=<run dir> [key=value ...]

Writes the ``## Inference`` section of ``reports/benchmarks.md`` (other sections are left as they are).
Measurements are interleaved in rounds and the median round is reported, because the machine is shared.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from leaflens.config import find_project_root, load_config
from leaflens.data.prepare import load_manifest
from leaflens.export.onnx import LogitsAndEmbedding, export_onnx
from leaflens.export.quantize import quantize_int8
from leaflens.export.run import run_processed_dir, split_paths
from leaflens.images import decode_image
from leaflens.logs import logger
from leaflens.preprocessing import preprocess_batch, spec_from_data_config
from leaflens.serving.engine import INPUT_NAME, make_session
from leaflens.train.checkpoint import load_run

ROUNDS = 5
SECONDS_PER_MEASUREMENT = 1.5
BATCH_SIZES = (1, 32)


def throughput(fn: Callable[[np.ndarray], object], batch: np.ndarray) -> float:
    """Images per second of ``fn(batch)`` over at least ``SECONDS_PER_MEASUREMENT`` (after one warm-up
    call)."""
    fn(batch)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < SECONDS_PER_MEASUREMENT or calls < 3:
        fn(batch)
        calls += 1
    return calls * len(batch) / elapsed


def accuracy(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray) -> float:
    preds = np.concatenate([fn(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
    return float((preds == labels).mean())


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## Inference`` section of ``path``."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(r"^## Inference\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(overrides: list[str]) -> Path:
    cfg = load_config(overrides, task_name="bench")
    if not cfg.run:
        raise SystemExit("usage: python scripts/bench_inference.py run=<run dir> [key=value ...]")
    threads = torch.get_num_threads()
    loaded = load_run(cfg.run, exportable=True)
    model = loaded.model.eval()
    spec = spec_from_data_config(loaded.data_config)
    manifest = load_manifest(run_processed_dir(Path(cfg.run), cfg))
    held_out = manifest[manifest["split"].isin(["val", "test"])].reset_index(drop=True)
    images = preprocess_batch([decode_image(p) for p in held_out["path"]], spec)
    labels = held_out["label_id"].to_numpy()
    calib_rows = split_paths(manifest, "train", int(cfg.export.int8_calibration_images), cfg.seed)
    calibration = preprocess_batch([decode_image(p) for p in calib_rows["path"]], spec)

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export_onnx(model, Path(tmp) / "model.onnx", spec["input_size"], int(cfg.export.opset))
        int8_path = quantize_int8(fp32_path, Path(tmp) / "model.int8.onnx", calibration)
        sessions = {"fp32": make_session(fp32_path, threads), "int8": make_session(int8_path, threads)}
        wrapper = LogitsAndEmbedding(model)

        def eager(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return wrapper(torch.from_numpy(batch))[0].numpy()

        def onnx(name: str) -> Callable[[np.ndarray], np.ndarray]:
            return lambda batch: sessions[name].run(["logits"], {INPUT_NAME: batch})[0]

        backends = {
            "PyTorch eager fp32": eager,
            "ONNX Runtime fp32": onnx("fp32"),
            "ONNX Runtime int8 (QDQ)": onnx("int8"),
        }
        acc = {name: accuracy(fn, images, labels) for name, fn in backends.items()}
        pool = np.concatenate([images] * (1 + 32 // len(images)))[:32]
        batches = {bs: np.ascontiguousarray(pool[:bs]) for bs in BATCH_SIZES}
        results: dict[tuple[str, int], list[float]] = {(n, bs): [] for n in backends for bs in BATCH_SIZES}
        load_before = os.getloadavg()
        for r in range(ROUNDS):
            for (name, bs), values in results.items():
                values.append(throughput(backends[name], batches[bs]))
            logger.info("round {}/{} done", r + 1, ROUNDS)
        load_after = os.getloadavg()
        sizes = {"fp32": fp32_path.stat().st_size / 1e6, "int8": int8_path.stat().st_size / 1e6}

    median = {key: statistics.median(v) for key, v in results.items()}
    spread = {key: (min(v), max(v)) for key, v in results.items()}
    base = {bs: median[("PyTorch eager fp32", bs)] for bs in BATCH_SIZES}
    drop = 100 * (acc["ONNX Runtime fp32"] - acc["ONNX Runtime int8 (QDQ)"])
    arch = loaded.model.pretrained_cfg.get("architecture")
    lines = [
        "## Inference",
        "",
        f"`python scripts/bench_inference.py run=<run>` — {arch} ({loaded.cfg.peft.strategy}, run "
        f"`{Path(cfg.run).name}`), "
        f"input {spec['input_size']}, {threads} threads, {platform.processor() or platform.machine()}, "
        f"onnxruntime {ort.__version__}, torch {torch.__version__}. Median of {ROUNDS} interleaved rounds "
        f"(min–max in brackets); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        "(shared machine: compare the ratios, measured together, rather than the absolute numbers).",
        "",
        "| backend | batch 1 img/s | batch 32 img/s | vs eager (bs 1 / bs 32) | held-out top-1 |",
        "|---|---|---|---|---|",
    ]
    for name in backends:
        cells = [
            f"{median[(name, bs)]:.0f} [{spread[(name, bs)][0]:.0f}–{spread[(name, bs)][1]:.0f}]"
            for bs in BATCH_SIZES
        ]
        ratio = " / ".join(f"×{median[(name, bs)] / base[bs]:.2f}" for bs in BATCH_SIZES)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | {100 * acc[name]:.1f} % |")
    speedup = {
        bs: median[("ONNX Runtime int8 (QDQ)", bs)] / median[("ONNX Runtime fp32", bs)] for bs in BATCH_SIZES
    }
    faster = min(speedup.values()) > 1.05
    verdict = "int8 is faster here" if faster else "int8 gives no reliable speed-up on this CPU"
    lines += [
        "",
        f"- int8 (static QDQ, per-channel weights, uint8 activations, calibrated on {len(calibration)} "
        "training images): "
        f"accuracy drop **{drop:.2f} points** on {len(labels)} held-out (val + test) images "
        f"(limit `export.int8_max_accuracy_drop` = {cfg.export.int8_max_accuracy_drop}); speed vs ONNX "
        "Runtime fp32 "
        f"×{speedup[1]:.2f} at batch 1, ×{speedup[32]:.2f} at batch 32; file {sizes['int8']:.1f} MB vs "
        f"{sizes['fp32']:.1f} MB.",
        f"- Verdict: {verdict}; "
        "ONNX Runtime fp32 is what the package serves by default (`export --int8` adds the int8 model, "
        "gated on accuracy).",
        "",
    ]
    out = find_project_root() / "reports" / "benchmarks.md"
    write_section(out, "\n".join(lines))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
