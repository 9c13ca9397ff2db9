"""Drift: compare what the service has seen (the monitoring store) with the package's training reference.

Per-feature tests are Evidently's stat tests (one per image statistic and per principal component of
the embeddings; the test chosen by Evidently for the sample size, as in its ``DataDriftPreset``, unless
configured); the embedding test is Evidently's domain classifier (``ModelDriftMethod``: a classifier that
tells reference from current embeddings; ROC AUC well above 0.5 means they differ). Verdict: drift when the
share of drifted features reaches ``drift_share`` or the embeddings drift. The HTML report is Evidently's
``DataDriftPreset``.

* :func:`compare` ``(reference, stats, embeddings, options) -> (result, snapshot)``: the comparison itself.
* :func:`check_drift` ``(package_dir, store_path, ...) -> dict``: what the API's ``/v1/drift`` route returns.
* :func:`drift` ``(cfg) -> Path``: ``leaflens drift``; writes ``drift.html``, ``drift.md`` and ``drift.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leaflens.logs import logger
from leaflens.monitoring import STAT_NAMES, Reference, SummaryStore, load_reference, stats_matrix


@dataclass
class DriftOptions:
    """How drift is tested: the ``drift`` section of the config (``configs/ops/default.yaml`` documents each
    value and holds the defaults)."""

    # Evidently stat test for every feature (e.g. "ks", "wasserstein", "psi"); None lets Evidently choose by
    # size.
    stattest: str | None
    # Threshold of that test (p-value for tests, distance for distances); None uses the test's default.
    threshold: float | None
    # The batch drifts when at least this share of the per-feature tests detect drift.
    drift_share: float
    # Principal components of the embeddings tested one by one (fitted on the reference).
    pca_components: int
    # Domain-classifier test on the embeddings: ROC AUC above this means drift.
    embedding_threshold: float
    # The classifier sees this many principal components of the embeddings (small samples overfit 1024-d).
    embedding_pca: int
    # Fewer current samples than this -> no verdict ("insufficient_data").
    min_samples: int
    # Features excluded from the tests (e.g. ["width", "height", "aspect"] when clients resize before
    # sending).
    exclude: Sequence[str]

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> DriftOptions:
        known = set(cls.__dataclass_fields__)
        values: dict[str, Any] = {k: v for k, v in dict(section).items() if k in known}
        if "exclude" in values:
            values["exclude"] = list(values["exclude"] or ())
        return cls(**values)


def _pca(reference: np.ndarray, current: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    n = max(1, min(n, reference.shape[0] - 1, reference.shape[1]))
    pca = PCA(n_components=n, random_state=0).fit(reference)
    return pca.transform(reference), pca.transform(current)


def _frames(reference: Reference, stats: np.ndarray, embeddings: np.ndarray, options: DriftOptions):
    import pandas as pd

    features = [name for name in STAT_NAMES if name not in set(options.exclude)]
    index = [STAT_NAMES.index(name) for name in features]
    ref_pc, cur_pc = _pca(reference.embeddings, embeddings, options.pca_components)
    pc_names = [f"embedding_pc{i + 1}" for i in range(ref_pc.shape[1])]
    ref = pd.DataFrame(np.hstack([reference.stats_array()[:, index], ref_pc]), columns=features + pc_names)
    cur = pd.DataFrame(np.hstack([stats[:, index], cur_pc]), columns=features + pc_names)
    return ref, cur


def _embedding_test(reference: np.ndarray, current: np.ndarray, options: DriftOptions) -> dict[str, Any]:
    import pandas as pd
    from evidently.metrics.embeddings import ModelDriftMethod

    ref_pc, cur_pc = _pca(reference, current, options.embedding_pca)
    method = ModelDriftMethod(threshold=options.embedding_threshold)
    score, drifted, name = method(pd.DataFrame(cur_pc), pd.DataFrame(ref_pc))
    return {
        "method": f"domain classifier ({name}, ROC AUC on {ref_pc.shape[1]} principal components)",
        "score": float(score),
        "threshold": options.embedding_threshold,
        "drift": bool(drifted),
    }


def _column_tests(ref: Any, cur: Any, options: DriftOptions) -> list[dict[str, Any]]:
    """One Evidently stat test per feature column (the same test selection as its DataDriftPreset)."""
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    rows = []
    for column in ref.columns:
        test = get_stattest(ref[column], cur[column], ColumnType.Numerical, options.stattest)
        outcome = test(ref[column], cur[column], ColumnType.Numerical, options.threshold)
        rows.append(
            {
                "feature": column,
                "test": test.display_name,
                "threshold": float(outcome.actual_threshold),
                "score": float(outcome.drift_score),
                "drift": bool(outcome.drifted),
            }
        )
    return rows


def _report(ref: Any, cur: Any, options: DriftOptions) -> Any:
    """Evidently's interactive report of the same per-feature tests (plots per column: ~0.5 s each)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(ref.columns))
    preset = DataDriftPreset(
        drift_share=options.drift_share, method=options.stattest, threshold=options.threshold
    )
    return Report([preset], include_tests=True).run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition),
    )


def compare(
    reference: Reference,
    stats: np.ndarray,
    embeddings: np.ndarray,
    options: DriftOptions,
    *,
    report: bool = False,
) -> tuple[dict[str, Any], Any]:
    """Test current image stats ``(N, len(STAT_NAMES))`` and embeddings ``(N, D)`` against the reference.

    Returns:
        ``(result, snapshot)``: the JSON-able result (``verdict`` in {"drift", "no_drift",
        "insufficient_data"}, per-feature ``tests``, ``embedding`` test, counts) and, with ``report=True`` and
        enough data, Evidently's report snapshot (``save_html``), else ``None``.
    """
    n_current = int(stats.shape[0])
    result: dict[str, Any] = {
        "n_reference": int(reference.embeddings.shape[0]),
        "n_current": n_current,
        "options": asdict(options) | {"exclude": list(options.exclude)},
    }
    if n_current < options.min_samples:
        return result | {
            "verdict": "insufficient_data",
            "message": f"{n_current} summaries; at least {options.min_samples} are needed for a drift test",
            "tests": [],
            "embedding": None,
        }, None
    if embeddings.shape[1] != reference.embeddings.shape[1]:
        raise ValueError(
            f"current embeddings have dimension {embeddings.shape[1]} but the reference has "
            f"{reference.embeddings.shape[1]}: the summaries come from another model"
        )
    ref_df, cur_df = _frames(reference, stats, embeddings, options)
    tests = _column_tests(ref_df, cur_df, options)
    snapshot = _report(ref_df, cur_df, options) if report else None
    embedding = _embedding_test(reference.embeddings, embeddings, options)
    share = sum(t["drift"] for t in tests) / max(1, len(tests))
    drifted = share >= options.drift_share or embedding["drift"]
    return result | {
        "verdict": "drift" if drifted else "no_drift",
        "drifted_share": share,
        "drifted_features": [t["feature"] for t in tests if t["drift"]],
        "tests": tests,
        "embedding": embedding,
    }, snapshot


def _package_version(package_dir: Path) -> str | None:
    model_json = package_dir / "model.json"
    if not model_json.is_file():
        return None
    version = json.loads(model_json.read_text()).get("version")
    return None if version is None else str(version)


def _load_current(
    store_path: str | Path, since: float | None, last_n: int | None, model_version: str | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    store_path = Path(store_path)
    if not store_path.is_file():
        raise FileNotFoundError(
            f"no monitoring store at {store_path}: serve the model first (summaries are logged per request) "
            "or "
            "point monitoring.store at the server's store"
        )
    with SummaryStore(store_path) as store:
        summaries = store.read(since=since, limit=last_n, model_version=model_version)
    stats = stats_matrix([s.stats for s in summaries])
    dims = {s.embedding.size for s in summaries}
    if len(dims) > 1:
        raise ValueError(f"summaries mix embedding sizes {sorted(dims)}; filter by model_version")
    embeddings = np.stack([s.embedding for s in summaries]) if summaries else np.zeros((0, 0), np.float32)
    window = {
        "store": str(store_path),
        "model_version": model_version,
        "since": since,
        "first": summaries[0].timestamp if summaries else None,
        "last": summaries[-1].timestamp if summaries else None,
    }
    return stats, embeddings, window


def check_drift(
    package_dir: str | Path,
    store_path: str | Path,
    *,
    since: float | None = None,
    last_n: int | None = 1000,
    options: DriftOptions | Mapping[str, Any],
) -> dict[str, Any]:
    """Drift of the store's latest summaries (of this package's model version) against the package reference.

    This is what ``GET /v1/drift`` returns (import it lazily: it needs pandas, scikit-learn and Evidently).
    """
    package_dir = Path(package_dir)
    if not isinstance(options, DriftOptions):
        options = DriftOptions.from_config(options)
    reference = load_reference(package_dir)
    stats, embeddings, window = _load_current(store_path, since, last_n, _package_version(package_dir))
    result, _ = compare(reference, stats, embeddings, options)
    return result | {"window": window, "package": str(package_dir), "checked_at": time.time()}


def _markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# Drift report",
        "",
        f"**Verdict: {result['verdict']}**  ",
        f"Package: `{result.get('package')}`  ",
        f"Reference images: {result['n_reference']} · current summaries: {result['n_current']}",
        "",
    ]
    if result["verdict"] == "insufficient_data":
        return "\n".join([*lines, result["message"], ""])
    emb = result["embedding"]
    lines += [
        f"Drifted features: {len(result['drifted_features'])} of {len(result['tests'])} "
        f"({result['drifted_share']:.0%}; drift from {result['options']['drift_share']:.0%})",
        "",
        f"Embeddings: {emb['method']}: score {emb['score']:.3f} (drift above {emb['threshold']}) -> "
        f"{'DRIFT' if emb['drift'] else 'ok'}",
        "",
        "| feature | test | score | threshold | drift |",
        "|---|---|---|---|---|",
    ]
    for t in result["tests"]:
        lines.append(
            f"| {t['feature']} | {t['test']} | {t['score']:.4g} | {t['threshold']} "
            f"| {'**yes**' if t['drift'] else 'no'} |"
        )
    return "\n".join([*lines, "", "Per-feature plots: `drift.html` (Evidently).", ""])


def drift(cfg) -> Path:
    """``leaflens drift package=<dir>``: drift.html, drift.md and drift.json in ``paths.output_dir``."""
    if not cfg.get("package"):
        raise ValueError("drift needs the model package whose reference to compare with: package=<dir>")
    from omegaconf import OmegaConf

    section: dict[str, Any] = OmegaConf.to_container(cfg.drift, resolve=True)  # type: ignore[assignment]
    package_dir = Path(cfg.package)
    options = DriftOptions.from_config(section)
    since = time.time() - float(section["window_hours"]) * 3600 if section.get("window_hours") else None
    reference = load_reference(package_dir)
    stats, embeddings, window = _load_current(
        section["store"], since, section.get("last_n"), _package_version(package_dir)
    )
    result, snapshot = compare(reference, stats, embeddings, options, report=True)
    result |= {"window": window, "package": str(package_dir), "checked_at": time.time()}
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(result, indent=2))
    (out / "drift.md").write_text(_markdown(result))
    if snapshot is not None:
        snapshot.save_html(str(out / "drift.html"))
    logger.info("Drift verdict: {} ({} current summaries) -> {}", result["verdict"], result["n_current"], out)
    return out
