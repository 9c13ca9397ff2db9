"""The one inference engine behind ``predict``, ``evaluate`` and the API: image -> calibrated diagnosis.

decode (EXIF orientation, RGB) -> resize / crop / normalise from ``preprocess.json`` -> ONNX Runtime ->
softmax(logits / T) -> top-k classes with crop, disease and probability, plus the "not sure" flag.

Only numpy, Pillow, OpenCV and onnxruntime are imported here: serving never loads torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from leaflens.images import ImageDecodeError, decode_image
from leaflens.preprocessing import preprocess_batch
from leaflens.serving.package import ModelPackage, PackageError, load_package

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")


@dataclass(frozen=True)
class ClassScore:
    """One candidate diagnosis."""

    class_id: int
    name: str
    display_name: str
    crop: str
    disease: str
    healthy: bool
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_id": self.class_id,
            "name": self.name,
            "display_name": self.display_name,
            "crop": self.crop,
            "disease": self.disease,
            "healthy": self.healthy,
            "probability": self.probability,
        }


@dataclass(frozen=True)
class Prediction:
    """The diagnosis of one image: the top-k classes (best first) and whether the model abstains."""

    top_k: list[ClassScore]
    abstain: bool
    confidence: float
    embedding: np.ndarray

    @property
    def best(self) -> ClassScore:
        return self.top_k[0]

    def to_dict(self, embedding: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.best.name,
            "display_name": self.best.display_name,
            "crop": self.best.crop,
            "disease": self.best.disease,
            "healthy": self.best.healthy,
            "confidence": self.confidence,
            "not_sure": self.abstain,
            "top_k": [score.to_dict() for score in self.top_k],
        }
        if embedding:
            out["embedding"] = self.embedding.tolist()
        return out


@dataclass(frozen=True)
class Result:
    """A prediction for one input, or the reason it could not be read (never both)."""

    source: str
    prediction: Prediction | None = None
    error: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable: the row max is subtracted first)."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def make_session(model_path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with full graph optimisation."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """``batch -> (logits, embedding)`` with ONNX Runtime; validates the model's input/output names."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        outputs = {o.name: o for o in session.get_outputs()}
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing or session.get_inputs()[0].name != INPUT_NAME:
            raise PackageError(
                f"the ONNX model must take input {INPUT_NAME!r} and give outputs {OUTPUT_NAMES}; missing "
                f"{missing}"
            )

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch)})
        return logits, embedding


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class InferenceEngine:
    """Calibrated top-k predictions from a verified model package.

    ``runner`` maps a preprocessed batch to ``(logits, embedding)``: ONNX Runtime for packages
    (:meth:`from_package`); evaluation of a training run plugs in its PyTorch model instead, so both go
    through the same preprocessing, calibration and top-k code. The engine holds no mutable state after
    construction (ONNX Runtime's ``run`` is thread-safe), so one instance can be shared by concurrent callers.
    """

    def __init__(self, package: ModelPackage, runner: Runner, top_k: int = 3) -> None:
        self.package = package
        self.runner = runner
        self.labels = package.labels
        self.spec = package.preprocess
        self.temperature = package.temperature
        self.threshold = package.abstain_threshold
        self.top_k = max(1, min(int(top_k), len(self.labels)))
        self.input_size = tuple(int(v) for v in self.spec["input_size"])

    @classmethod
    def from_package(
        cls, package_dir: str | Path, variant: str = "fp32", threads: int | None = None, top_k: int = 3
    ) -> InferenceEngine:
        """Verify and load ``package_dir``; ``variant`` picks ``model.onnx`` (fp32) or ``model.int8.onnx``."""
        package = load_package(package_dir)
        return cls(package, OnnxRunner(make_session(package.model_path(variant), threads)), top_k=top_k)

    def with_calibration(self, calibration: dict[str, Any]) -> InferenceEngine:
        """A copy of this engine using another ``calibration.json`` content (temperature, abstain rule)."""
        return InferenceEngine(replace(self.package, calibration=calibration), self.runner, self.top_k)

    # -- numeric core -------------------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw model outputs for a preprocessed ``(N, 3, H, W)`` float32 batch: ``(logits, embedding)``."""
        return self.runner(batch)

    def calibrated_probs(self, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / T) with the package's fitted temperature."""
        return softmax(logits, self.temperature)

    def _score(self, probs: np.ndarray, class_id: int) -> ClassScore:
        record = self.labels[class_id]
        return ClassScore(
            class_id=int(class_id),
            name=str(record["name"]),
            display_name=str(record.get("display_name", record["name"])),
            crop=str(record.get("crop", "")),
            disease=str(record.get("disease", "")),
            healthy=bool(record.get("healthy", False)),
            probability=float(probs[class_id]),
        )

    def predictions_from_outputs(
        self, logits: np.ndarray, embedding: np.ndarray, top_k: int | None = None
    ) -> list[Prediction]:
        """Turn raw outputs into :class:`Prediction` records (calibrated, top-k, abstain flag)."""
        k = max(1, min(int(top_k or self.top_k), len(self.labels)))
        probs = self.calibrated_probs(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        predictions = []
        for row, ids, emb in zip(probs, order, embedding, strict=True):
            confidence = float(row[ids[0]])
            predictions.append(
                Prediction(
                    top_k=[self._score(row, int(i)) for i in ids],
                    abstain=confidence < self.threshold,
                    confidence=confidence,
                    embedding=np.asarray(emb, dtype=np.float32),
                )
            )
        return predictions

    # -- public batch API -----------------------------------------------------------------------------------
    def predict_arrays(self, images: Sequence[np.ndarray], top_k: int | None = None) -> list[Prediction]:
        """Predict decoded ``(H, W, 3)`` uint8 RGB images (e.g. from :func:`leaflens.images.decode_image`)."""
        if len(images) == 0:
            return []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB arrays, got {image.shape} {image.dtype}")
        logits, embedding = self.infer(preprocess_batch(list(images), self.spec))
        return self.predictions_from_outputs(logits, embedding, top_k)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(N, D)`` embeddings of decoded RGB images (the drift reference and monitoring use them)."""
        return self.infer(preprocess_batch(list(images), self.spec))[1]

    def _predict_sources(
        self, sources: Sequence[bytes | str | Path], names: Sequence[str], top_k: int | None
    ) -> list[Result]:
        results: list[Result | None] = [None] * len(sources)
        decoded: list[tuple[int, np.ndarray]] = []
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            try:
                decoded.append((i, decode_image(source)))
            except ImageDecodeError as err:
                results[i] = Result(source=name, error=str(err), reason=err.reason)
            except OSError as err:  # unreadable path: permission denied, a directory, vanished file
                results[i] = Result(source=name, error=f"cannot read file: {err}", reason="unreadable")
        if decoded:
            predictions = self.predict_arrays([image for _, image in decoded], top_k)
            for (i, _), prediction in zip(decoded, predictions, strict=True):
                results[i] = Result(source=names[i], prediction=prediction)
        return [r for r in results if r is not None]

    def predict_bytes(
        self, blobs: Sequence[bytes], names: Sequence[str] | None = None, top_k: int | None = None
    ) -> list[Result]:
        """Decode and predict encoded images; undecodable items get a :class:`Result` with ``error``."""
        names = list(names) if names is not None else [f"item-{i}" for i in range(len(blobs))]
        return self._predict_sources(list(blobs), names, top_k)

    def predict_paths(self, paths: Sequence[str | Path], top_k: int | None = None) -> list[Result]:
        """Decode and predict image files; unreadable files get a :class:`Result` with ``error``."""
        return self._predict_sources([Path(p) for p in paths], [str(p) for p in paths], top_k)
