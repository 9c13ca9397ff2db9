"""Run the inference engine over many image files in batches, keeping the unreadable ones on record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leaflens.images import ImageDecodeError, decode_image
from leaflens.logs import logger
from leaflens.preprocessing import preprocess_batch
from leaflens.serving.engine import InferenceEngine


@dataclass
class Scores:
    """Raw outputs for the readable files (``index`` points back into the input list) and the failures."""

    logits: np.ndarray
    embedding: np.ndarray
    index: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)


def score_paths(
    engine: InferenceEngine, paths: Sequence[str | Path], batch_size: int = 64, desc: str = "scoring"
) -> Scores:
    """``engine.infer`` over ``paths`` in batches; files that fail to decode are logged and listed in
    ``failed``."""
    logits, embeddings, index, failed = [], [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        images, ids = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(decode_image(paths[i]))
                ids.append(i)
            except ImageDecodeError as err:
                logger.warning("{}: skipping {}: {}", desc, paths[i], err)
                failed.append({"path": str(paths[i]), "reason": err.reason, "error": str(err)})
        if images:
            out_logits, out_emb = engine.infer(preprocess_batch(images, engine.spec))
            logits.append(out_logits)
            embeddings.append(out_emb)
            index.extend(ids)
    if not index:
        raise ValueError(f"{desc}: none of the {len(paths)} images could be read")
    return Scores(np.concatenate(logits), np.concatenate(embeddings), np.asarray(index), failed)
