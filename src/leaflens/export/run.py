"""``leaflens export run=<dir>``: write a self-contained, checksummed model package (see docs/design.md).

The package is assembled in a temporary sibling directory and moved into place only once complete and
verified, so a failed export never leaves a half-written package where a server would load it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

import leaflens
from leaflens.images import decode_image
from leaflens.logs import logger
from leaflens.model.heads import classifier_info
from leaflens.preprocessing import preprocess_batch, spec_from_data_config
from leaflens.serving.engine import InferenceEngine, OnnxRunner, make_session
from leaflens.serving.package import ModelPackage, load_package, write_manifest

DEFAULT_CALIBRATION = {"temperature": 1.0, "abstain": {"method": "max_prob", "threshold": 0.0}}


def _json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def run_processed_dir(run_dir: Path, cfg: DictConfig) -> Path:
    """The prepared dataset a run was trained on (``data.json``), else ``data.processed_dir``."""
    recorded = _read_json(run_dir / "data.json", {}).get("processed_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return Path(cfg.data.processed_dir)


def split_paths(manifest: pd.DataFrame, split: str, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Rows of one split, a seeded random subset of at most ``limit`` (all rows when ``limit`` is None)."""
    rows = manifest[manifest["split"] == split]
    if limit is not None and len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed)
    return rows.reset_index(drop=True)


def model_info(
    model: Any,
    run_dir: Path,
    spec: dict[str, Any],
    trainable: dict[str, Any],
    opset: int | None,
    test_time_flips: bool = False,
) -> dict:
    """``model.json``: what to rebuild the torch model from (Grad-CAM) and where it came from."""
    return {
        "arch": model.pretrained_cfg.get("architecture")
        if hasattr(model, "pretrained_cfg")
        else type(model).__name__,
        "num_classes": int(model.num_classes),
        # Below 32 the last stages run dilated (model.output_stride); the weights alone do not say so.
        "output_stride": int(getattr(model, "output_stride", 32)),
        # linear, or cosine with its scale (model.classifier): the classifier the weights belong to.
        **(classifier_info(model) if hasattr(model, "pretrained_cfg") else {}),
        "input_size": list(spec["input_size"]),
        "strategy": trainable.get("strategy"),
        "trainable_percent": trainable.get("percent"),
        "opset": opset,
        # The graph averages the four flips of each image (4x the compute of one view).
        "test_time_flips": test_time_flips,
        "version": leaflens.__version__,
        "run": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_package(run_dir: Path, loaded: Any, calibration: dict[str, Any] | None = None) -> ModelPackage:
    """An in-memory :class:`ModelPackage` for a training run (evaluation drives the engine with it)."""
    spec = spec_from_data_config(loaded.data_config)
    trainable = _read_json(run_dir / "trainable.json", {})
    return ModelPackage(
        dir=run_dir,
        labels=list(loaded.classes),
        preprocess=spec,
        calibration=calibration or _read_json(run_dir / "calibration.json", DEFAULT_CALIBRATION),
        model_info=model_info(loaded.model, run_dir, spec, trainable, None, loaded.test_time_flips),
    )


def _load_batch(paths: list[str], spec: dict[str, Any]) -> np.ndarray:
    return preprocess_batch([decode_image(p) for p in paths], spec)


def _int8(cfg: DictConfig, out: Path, manifest: pd.DataFrame, spec: dict[str, Any]) -> dict[str, Any]:
    from leaflens.export.quantize import compare_int8, gate_int8, quantize_int8

    calib = split_paths(manifest, "train", int(cfg.export.int8_calibration_images), cfg.seed)
    quantize_int8(out / "model.onnx", out / "model.int8.onnx", _load_batch(list(calib["path"]), spec))
    held_out = manifest[manifest["split"].isin(["val", "test"])]
    report = compare_int8(
        out / "model.onnx",
        out / "model.int8.onnx",
        _load_batch(list(held_out["path"]), spec),
        held_out["label_id"].to_numpy(),
    )
    report["calibration_images"] = len(calib)
    try:
        return gate_int8(report, float(cfg.export.int8_max_accuracy_drop))
    except RuntimeError:
        (out / "model.int8.onnx").unlink()
        _json(out / "quantization.json", {**report, "accepted": False})
        raise


def export(cfg: DictConfig) -> Path:
    """Export ``cfg.run`` to the package directory ``cfg.paths.output_dir`` and return it."""
    from safetensors.torch import save_file

    from leaflens.data.prepare import load_manifest
    from leaflens.export.card import model_card
    from leaflens.export.onnx import check_parity, export_onnx
    from leaflens.export.quantize import Int8RefusedError
    from leaflens.train.checkpoint import load_run

    if not cfg.run:
        raise ValueError("export needs a training run: leaflens export run=<run dir>")
    run_dir = Path(cfg.run).expanduser().resolve()
    final = Path(cfg.paths.output_dir).expanduser().resolve()
    # exportable=True: ONNX-friendly activations (e.g. MobileNetV3's hard-swish), same weights.
    loaded = load_run(run_dir, exportable=True)
    model = loaded.model.eval()
    manifest = load_manifest(run_processed_dir(run_dir, cfg))
    spec = spec_from_data_config(loaded.data_config)
    trainable = _read_json(run_dir / "trainable.json", {})

    out = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        flips = loaded.test_time_flips
        export_onnx(model, out / "model.onnx", spec["input_size"], int(cfg.export.opset), flips)
        val = split_paths(manifest, "val", int(cfg.export.parity_images), cfg.seed)
        parity = check_parity(
            model,
            out / "model.onnx",
            _load_batch(list(val["path"]), spec),
            float(cfg.export.parity_atol),
            out / "parity.json",
            flips,
        )

        calibration = _read_json(run_dir / "calibration.json")
        if calibration is None:
            # Export without a prior `leaflens evaluate`: fit the same calibration here so the package is
            # usable.
            from leaflens.evaluate.calibration import calibrate, calibration_split
            from leaflens.evaluate.scoring import score_paths

            logger.warning(
                "{} has no calibration.json (run `leaflens evaluate` first); fitting it now", run_dir
            )
            engine = InferenceEngine(
                run_package(run_dir, loaded, DEFAULT_CALIBRATION),
                OnnxRunner(make_session(out / "model.onnx")),
            )
            trained_on = loaded.train_splits
            fit = split_paths(manifest, calibration_split(trained_on))
            scores = score_paths(engine, list(fit["path"]), desc="calibration")
            calibration = calibrate(
                scores.logits,
                fit["label_id"].to_numpy()[scores.index],
                len(loaded.classes),
                float(cfg.evaluate.max_false_abstain_rate),
                int(cfg.evaluate.calibration_bins),
            )
            calibration.update(
                fitted_by="export", fitted_on=calibration_split(trained_on), trained_on=trained_on
            )
        _json(out / "calibration.json", calibration)
        _json(out / "labels.json", list(loaded.classes))
        _json(out / "preprocess.json", spec)
        info = model_info(model, run_dir, spec, trainable, int(cfg.export.opset), flips)
        _json(out / "model.json", info)
        save_file(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            str(out / "weights.safetensors"),
        )

        evaluation = _read_json(run_dir / "evaluation.json", {})
        metrics = {
            "training": _read_json(run_dir / "metrics.json", {}),
            "validation": evaluation.get("validation"),
            "test": evaluation.get("test"),
            "non_leaf": evaluation.get("non_leaf"),
            "parity": parity,
        }
        quantization, refused = None, None
        if cfg.export.int8:
            try:
                quantization = _int8(cfg, out, manifest, spec)
                _json(out / "quantization.json", quantization)
            except Int8RefusedError as err:
                refused, quantization = err, _read_json(out / "quantization.json")
        metrics["int8"] = quantization
        _json(out / "metrics.json", metrics)
        split_counts = (
            manifest["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int)
        )
        (out / "MODEL_CARD.md").write_text(
            model_card(
                info,
                loaded.classes,
                split_counts.to_dict(),
                trainable,
                metrics,
                calibration,
                parity,
                quantization,
            ),
            encoding="utf-8",
        )
        _write_reference(cfg, out, loaded, manifest, calibration)
        for path in out.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a server running as another user must read it
        write_manifest(out)
        load_package(out)  # verify what we are about to publish
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    logger.info("Model package written to {}", final)
    if refused is not None:
        raise refused
    return final


def _write_reference(
    cfg: DictConfig, out: Path, loaded: Any, manifest: pd.DataFrame, calibration: dict
) -> None:
    """Drift reference (image stats + embeddings of training images) from the ops helper's monitoring
    module."""
    try:
        from leaflens.monitoring import write_reference
    except ImportError:
        logger.warning("leaflens.monitoring is not available: the package has no drift reference")
        return
    engine = InferenceEngine(
        ModelPackage(
            dir=out,
            labels=list(loaded.classes),
            preprocess=_read_json(out / "preprocess.json"),
            calibration=calibration,
            model_info=_read_json(out / "model.json"),
        ),
        OnnxRunner(make_session(out / "model.onnx")),
    )
    train = split_paths(manifest, "train", int(cfg.export.reference_images), cfg.seed)
    write_reference(out, engine, list(train["path"]), source=f"training split of {cfg.run}")
