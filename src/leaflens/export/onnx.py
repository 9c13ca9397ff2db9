"""Export a timm classifier to ONNX with two outputs (``logits``, ``embedding``) and check it against PyTorch.

The graph takes the preprocessed ``image`` batch (dynamic batch size) so the same ``preprocess.json`` drives
every runtime. ``embedding`` is timm's pre-logits feature vector, kept for drift monitoring. With test-time
flips the graph itself averages the four flips of each image, so every runtime and the API get them for free.
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


def four_flips(image: torch.Tensor) -> torch.Tensor:
    """The batch followed by its horizontal, vertical and double flips: ``(4 * B, C, H, W)``."""
    return torch.cat([image, image.flip(3), image.flip(2), image.flip((2, 3))])


class LogitsAndEmbedding(nn.Module):
    """Wrap a timm model so one forward gives ``(logits, pre-logits embedding)``.

    Args:
        model: A timm classifier whose logits are its classifier applied to ``forward_head(pre_logits=True)``
            (checked by :func:`export_onnx`).
        flips: Average the four flips of each image (``model.test_time_flips``): the logits are the mean of the
            four views' logits (for a linear classifier, also the logits of the mean embedding; not for a
            cosine one), the embedding the mean of their embeddings.
    """

    def __init__(self, model: nn.Module, flips: bool = False) -> None:
        super().__init__()
        # Any: timm's forward_features / forward_head / get_classifier are not on nn.Module's type.
        self.model: Any = model
        self.flips = flips

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = four_flips(image) if self.flips else image
        embedding = self.model.forward_head(self.model.forward_features(views), pre_logits=True)
        logits = self.model.get_classifier()(embedding)
        if self.flips:
            logits = logits.reshape(4, image.shape[0], -1).mean(dim=0)
            embedding = embedding.reshape(4, image.shape[0], -1).mean(dim=0)
        return logits, embedding


def reference_logits(model: nn.Module, image: torch.Tensor, flips: bool = False) -> torch.Tensor:
    """What the wrapper's logits must equal: ``model(x)``, or its mean over the four flips."""
    if not flips:
        return model(image)
    return model(four_flips(image)).reshape(4, image.shape[0], -1).mean(dim=0)


def export_onnx(
    model: nn.Module, path: Path, input_size: Sequence[int], opset: int = 18, flips: bool = False
) -> Path:
    """Write ``model`` (eval mode, LoRA already merged) to a single-file ONNX model at ``path``.

    Args:
        flips: Bake test-time flips into the graph (:class:`LogitsAndEmbedding`).

    Raises:
        ValueError: if the wrapped logits differ from :func:`reference_logits` (a timm head this wrapper does
            not cover, e.g. one with layers between the pre-logits features and the classifier).
    """
    if opset < 17:
        raise ValueError(f"export.opset must be >= 17 (got {opset})")
    wrapper = LogitsAndEmbedding(model, flips).eval()
    example = torch.randn(2, *[int(v) for v in input_size])
    with torch.no_grad():
        logits, _ = wrapper(example)
        reference = reference_logits(model, example, flips)
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


def torch_outputs(
    model: nn.Module, batch: np.ndarray, batch_size: int = 64, flips: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, embedding)`` from PyTorch for a preprocessed numpy batch."""
    wrapper = LogitsAndEmbedding(model, flips).eval()
    logits, embeddings = [], []
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            out_logits, out_emb = wrapper(torch.from_numpy(batch[start : start + batch_size]))
            logits.append(out_logits.numpy())
            embeddings.append(out_emb.numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    batch: np.ndarray,
    atol: float,
    out_path: Path | None = None,
    flips: bool = False,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``batch``; write ``parity.json``; raise if they disagree.

    Args:
        flips: Whether the graph averages test-time flips (PyTorch then does the same).

    Raises:
        ParityError: if top-1 agreement is below 100 % or the max |logit difference| exceeds ``atol``.
    """
    torch_logits, torch_emb = torch_outputs(model, batch, flips=flips)
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

    def __init__(self, model: nn.Module, batch_size: int = 64, flips: bool = False) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.flips = flips

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return torch_outputs(
            self.model, np.ascontiguousarray(batch, dtype=np.float32), self.batch_size, self.flips
        )
