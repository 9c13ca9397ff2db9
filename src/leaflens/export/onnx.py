"""Export a timm classifier to ONNX with two outputs (``logits``, ``embedding``) and check it against PyTorch.

The graph takes the preprocessed ``image`` batch (dynamic batch size) so the same ``preprocess.json`` drives
every runtime. ``embedding`` is timm's pre-logits feature vector, kept for drift monitoring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leaflens.logs import logger
from leaflens.serving.engine import INPUT_NAME, OUTPUT_NAMES, make_session


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the allowed tolerance."""


class LogitsAndEmbedding(nn.Module):
    """Wrap a timm model so one forward gives ``(logits, pre-logits embedding)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # Any: timm's forward_features / forward_head / get_classifier are not on nn.Module's type.
        self.model: Any = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(image)
        embedding = self.model.forward_head(features, pre_logits=True)
        logits = self.model.get_classifier()(embedding)
        return logits, embedding


def export_onnx(model: nn.Module, path: Path, input_size: Sequence[int], opset: int = 18) -> Path:
    """Write ``model`` (eval mode, LoRA already merged) to a single-file ONNX model at ``path``.

    Raises:
        ValueError: if the wrapped logits differ from ``model(x)`` (a timm head this wrapper does not cover).
    """
    if opset < 17:
        raise ValueError(f"export.opset must be >= 17 (got {opset})")
    wrapper = LogitsAndEmbedding(model).eval()
    example = torch.randn(2, *[int(v) for v in input_size])
    with torch.no_grad():
        logits, _ = wrapper(example)
        reference = model(example)
    if not torch.allclose(logits, reference, atol=1e-5, rtol=1e-5):
        raise ValueError(
            f"{type(model).__name__}: classifier(forward_head(pre_logits=True)) != model(x); "
            "this architecture's head needs its own embedding wrapper"
        )
    batch = torch.export.Dim("batch", min=1, max=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    # external_data=False folds the weights into model.onnx (torch 2.14 otherwise writes model.onnx.data too).
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"image": {0: batch}},
    )
    import onnx

    onnx.checker.check_model(str(path))
    logger.info("Exported ONNX opset {} to {} ({:.1f} MB)", opset, path, path.stat().st_size / 1e6)
    return path


def torch_outputs(model: nn.Module, batch: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, embedding)`` from PyTorch for a preprocessed numpy batch."""
    wrapper = LogitsAndEmbedding(model).eval()
    logits, embeddings = [], []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            out_logits, out_emb = wrapper(torch.from_numpy(batch[start : start + batch_size]))
            logits.append(out_logits.numpy())
            embeddings.append(out_emb.numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def check_parity(
    model: nn.Module, onnx_path: Path, batch: np.ndarray, atol: float, out_path: Path | None = None
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``batch``; write ``parity.json``; raise if they disagree.

    Raises:
        ParityError: if top-1 agreement is below 100 % or the max |logit difference| exceeds ``atol``.
    """
    torch_logits, torch_emb = torch_outputs(model, batch)
    session = make_session(onnx_path)
    ort_logits, ort_emb = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    report = {
        "images": len(batch),
        "max_abs_logit_diff": float(np.abs(ort_logits - torch_logits).max()),
        "max_abs_embedding_diff": float(np.abs(ort_emb - torch_emb).max()),
        "top1_agreement": float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "atol": float(atol),
    }
    report["passed"] = bool(report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= atol)
    if out_path is not None:
        out_path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "Parity on {} images: max |logit diff| {:.2e}, top-1 agreement {:.1%}",
        report["images"],
        report["max_abs_logit_diff"],
        report["top1_agreement"],
    )
    if not report["passed"]:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch: top-1 agreement {report['top1_agreement']:.2%} "
            f"(need 100%), max |logit diff| {report['max_abs_logit_diff']:.2e} (limit {atol:.0e})"
        )
    return report


class TorchRunner:
    """``batch -> (logits, embedding)`` with PyTorch: the engine's backend when evaluating a training run."""

    def __init__(self, model: nn.Module, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.batch_size = batch_size

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return torch_outputs(self.model, np.ascontiguousarray(batch, dtype=np.float32), self.batch_size)
