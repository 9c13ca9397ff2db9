"""The HTTP service: ``create_app(package_dir, settings)`` builds a FastAPI app around one model package.

The package is loaded (and its checksums verified) in the app's ``lifespan``, never at import, so importing
this module is cheap and a bad package stops start-up with the package's own error message. Nothing here
imports torch: Grad-CAM (``?explain=true``) imports it lazily, on the first request that asks for it.

Every error answer is ``{"error": {"code", "message", "filename"}}`` (schema ``ErrorResponse``); bad input is
a 4xx with a reason, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import BackgroundTasks, FastAPI, File, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leaflens.images import ImageDecodeError, decode_image
from leaflens.logs import logger
from leaflens.preprocessing import preprocess
from leaflens.serving import schemas
from leaflens.serving.batching import MicroBatcher
from leaflens.serving.metrics import RequestMetricsMiddleware, ServingMetrics

STATIC_DIR = Path(str(resources.files("leaflens") / "static"))
# Room for the multipart envelope (boundaries, part headers) on top of the file bytes themselves.
MULTIPART_OVERHEAD = 64 * 1024
# HTTP status of each decode failure reason (leaflens.images.ImageDecodeError.reason).
DECODE_STATUS = {"empty": 400, "not_an_image": 415, "too_large": 413, "corrupt": 422, "too_small": 422}


@dataclass(frozen=True)
class ServeSettings:
    """What the service needs from ``cfg.serve`` (``configs/serve/default.yaml`` documents each value);
    built by :func:`leaflens.serving.server.settings_from_config`."""

    max_upload_bytes: int
    max_pixels: int
    max_batch_files: int
    min_image_side: int
    max_batch_size: int
    max_wait_ms: float
    num_threads: int
    batch_concurrency: int
    top_k: int
    summaries_path: Path | None
    store_raw_images: bool
    # The `drift` config section, for GET /v1/drift.
    drift: dict[str, Any]


class ApiError(Exception):
    """An answer other than 2xx, with a machine-readable ``code`` and a message for a person."""

    def __init__(self, status: int, code: str, message: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.filename = status, code, message, filename


class StartupError(RuntimeError):
    """The model package could not be loaded: the service refuses to start."""


@dataclass
class ServiceState:
    """Everything the routes use, built in the lifespan."""

    engine: Any
    batcher: MicroBatcher
    model_info: schemas.ModelInfo
    store: Any | None = None


# -- helpers -------------------------------------------------------------------------------------------------
def _error(status: int, code: str, message: str, filename: str | None = None) -> JSONResponse:
    body = schemas.ErrorResponse(error=schemas.ErrorDetail(code=code, message=message, filename=filename))
    return JSONResponse(body.model_dump(), status_code=status)


def _state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    return state


def _load(
    package_dir: Path, settings: ServeSettings, metrics: ServingMetrics
) -> tuple[Any, schemas.ModelInfo]:
    """Load and verify the package; the engine and what ``GET /v1/model`` reports about it."""
    from leaflens.serving.engine import InferenceEngine
    from leaflens.serving.package import MANIFEST, sha256_file

    start = time.perf_counter()
    engine = InferenceEngine.from_package(
        package_dir, threads=settings.num_threads or None, top_k=settings.top_k
    )
    seconds = time.perf_counter() - start
    package = engine.package
    version = str(package.model_info.get("version", "unknown"))
    package_sha = sha256_file(package.dir / MANIFEST)
    metrics.model_load_seconds.set(seconds)
    metrics.model_info.labels(version=version, sha256=package_sha).set(1)
    info = schemas.ModelInfo(
        version=version,
        arch=package.model_info.get("arch"),
        num_classes=len(package.labels),
        labels=[schemas.LabelInfo.model_validate(_label_record(r)) for r in package.labels],
        preprocessing=package.preprocess,
        calibration=package.calibration,
        metrics=package.metrics,
        package_sha256=package_sha,
        files=package.files,
        load_seconds=seconds,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        explain_available=_explain_available(package.files),
    )
    return engine, info


def _label_record(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(record["id"]),
        "name": str(record["name"]),
        "display_name": str(record.get("display_name", record["name"])),
        "crop": str(record.get("crop", "")),
        "disease": str(record.get("disease", "")),
        "healthy": bool(record.get("healthy", False)),
    }


def _open_store(settings: ServeSettings) -> Any | None:
    if settings.summaries_path is None:
        return None
    from leaflens.monitoring import SummaryStore

    return SummaryStore(settings.summaries_path)


def _record_summary(store: Any, rgb: np.ndarray, prediction: Any, version: str, keep_image: bool) -> None:
    """Append one request's input summary (stats + embedding) to the drift store, after the answer."""
    from leaflens.monitoring import make_summary

    predicted = "abstain" if prediction.abstain else prediction.best.name
    store.append(
        make_summary(
            rgb,
            prediction.embedding,
            predicted,
            prediction.confidence,
            model_version=version,
            keep_image=keep_image,
        )
    )


def _explain_available(files: dict[str, str]) -> bool:
    """Grad-CAM needs the package's torch weights and the training stack (found without importing it)."""
    from importlib.util import find_spec

    modules = ("torch", "timm", "pytorch_grad_cam", "safetensors")
    return "weights.safetensors" in files and all(find_spec(m) is not None for m in modules)


def _explain(package_dir: Path, rgb: np.ndarray, class_id: int) -> str:
    """Grad-CAM overlay for ``class_id`` as a PNG data URL (imports torch, builds the model on first use)."""
    import cv2

    from leaflens.explain import explain_package_image

    overlay = explain_package_image(package_dir, rgb, class_id)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.asarray(overlay, dtype=np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise ValueError("could not encode the overlay as PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


async def _read_upload(upload: UploadFile, settings: ServeSettings) -> bytes:
    name = upload.filename
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", _too_big(upload.size, settings.max_upload_bytes), name)
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", _too_big(len(data), settings.max_upload_bytes), name)
    return data


def _too_big(size: int, limit: int) -> str:
    return f"the file is larger than the limit of {limit} bytes" + (
        f" ({size} bytes)" if size > limit else ""
    )


def _decode_and_preprocess(data: bytes, settings: ServeSettings, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    rgb = decode_image(data, settings.max_pixels, settings.min_image_side)
    return rgb, preprocess(rgb, spec)


async def _decode(
    data: bytes, filename: str | None, settings: ServeSettings, metrics: ServingMetrics, spec: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the bytes (whatever the content type claims) and make the model input, on the thread pool.

    Both happen here, per request and in parallel, so the batch thread only runs the model.

    Raises:
        ApiError: with the reason the bytes are not a usable image.
    """
    try:
        return await run_in_threadpool(_decode_and_preprocess, data, settings, spec)
    except ImageDecodeError as err:
        metrics.input_errors.labels(reason=err.reason).inc()
        raise ApiError(DECODE_STATUS.get(err.reason, 422), err.reason, str(err), filename) from err


def _to_schema(
    prediction: Any, filename: str | None, rgb: np.ndarray, version: str, ms: float, threshold: float
):
    return schemas.Prediction(
        filename=filename,
        top_k=[schemas.Diagnosis(**score.to_dict()) for score in prediction.top_k],
        not_sure=bool(prediction.abstain),
        abstain_threshold=threshold,
        model_version=version,
        inference_ms=round(ms, 3),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
    )


def _missing_file_message(field_name: str, request: Request, form_keys: list[str]) -> str:
    content_type = request.headers.get("content-type", "none").split(";")[0]
    got = f"fields {form_keys}" if form_keys else "no form fields"
    return (
        f"send the image as multipart/form-data in a field named '{field_name}' "
        f"(got content type {content_type} with {got})"
    )


async def _form_keys(request: Request) -> list[str]:
    try:
        form = await request.form()
    except (StarletteHTTPException, AssertionError, ValueError):
        return []
    return sorted(set(form.keys()))


# -- body size limit -----------------------------------------------------------------------------------------
class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once the body passes the limit; an HTTPException so FastAPI's body parsing
    passes it through (it turns other exceptions into a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over a per-path limit with 413, up front (Content-Length) or while they stream in."""

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _error(413, "too_large_request", str(_BodyTooLarge(limit).detail))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


# -- the app -------------------------------------------------------------------------------------------------
def create_app(package_dir: str | Path, settings: ServeSettings) -> FastAPI:
    """The leaflens service for the model package in ``package_dir`` (loaded when the app starts).

    Args:
        package_dir: An exported model package (``leaflens export``).
        settings: Limits, micro-batching and the summary store (``settings_from_config(cfg.serve)``).

    Returns:
        The FastAPI app; run it with uvicorn, or ``with TestClient(app)`` in tests (that runs the lifespan).
    """
    package_dir = Path(package_dir)
    metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            engine, info = await run_in_threadpool(_load, package_dir, settings, metrics)
        except Exception as err:  # any failure to load is fatal and must name the package and the cause
            message = f"cannot serve model package {package_dir}: {err}"
            logger.error(message)
            raise StartupError(message) from err
        store = await run_in_threadpool(_open_store, settings)
        batcher: MicroBatcher = MicroBatcher(
            _batch_fn(engine),
            settings.max_batch_size,
            settings.max_wait_ms,
            concurrency=batch_concurrency(settings),
            on_batch=metrics.observe_batch,
        )
        await batcher.start()
        app.state.service = ServiceState(engine=engine, batcher=batcher, model_info=info, store=store)
        logger.info(
            "Serving model {} ({} classes) from {}, loaded in {:.2f} s; micro-batching {}",
            info.version,
            info.num_classes,
            package_dir,
            info.load_seconds,
            f"up to {settings.max_batch_size} images / {settings.max_wait_ms} ms, "
            f"{batcher.concurrency} batch(es) at a time, {settings.num_threads or 'all'} engine thread(s)"
            if batcher.enabled
            else "off",
        )
        try:
            yield
        finally:
            app.state.service = None
            await batcher.stop()
            if store is not None:
                store.close()

    app = FastAPI(
        title="leaflens",
        version=_package_version(),
        summary="Diagnose plant diseases from leaf photos.",
        description="Upload a photo of one leaf; get the most likely crop and disease with calibrated "
        'probabilities, a "not sure" flag and optionally a Grad-CAM overlay. Errors are JSON '
        "`ErrorResponse`.",
        lifespan=lifespan,
        responses={
            400: {"model": schemas.ErrorResponse},
            413: {"model": schemas.ErrorResponse},
            415: {"model": schemas.ErrorResponse},
            422: {"model": schemas.ErrorResponse},
            503: {"model": schemas.ErrorResponse},
        },
    )
    app.state.service = None
    app.state.metrics = metrics
    app.state.settings = settings
    _install_error_handlers(app)
    _add_routes(app, settings, metrics)
    _add_drift_route(app, package_dir, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(
        BodyLimitMiddleware,
        limits={
            "/v1/predict": settings.max_upload_bytes + MULTIPART_OVERHEAD,
            "/v1/predict/batch": settings.max_batch_files * (settings.max_upload_bytes + MULTIPART_OVERHEAD),
        },
        default=MULTIPART_OVERHEAD,
    )
    # Outermost, so it also counts the 413s of the body limit and the errors of every handler.
    app.add_middleware(
        RequestMetricsMiddleware,
        metrics=metrics,
        skip={"/metrics"},
        templates=[path for r in app.routes if "{" not in (path := str(getattr(r, "path", "{")))],
        prefixes=["/static"],
    )
    return app


def batch_concurrency(settings: ServeSettings) -> int:
    """Batches in flight: as set, or (0) enough single-threaded engine calls to use every core."""
    if settings.batch_concurrency > 0:
        return settings.batch_concurrency
    if settings.num_threads <= 0:  # ONNX Runtime already spreads one batch over every core
        return 1
    return max(1, (os.cpu_count() or 1) // settings.num_threads)


def _batch_fn(engine: Any):
    """Preprocessed inputs -> (prediction, engine ms) each: ``engine.predict_arrays`` after preprocessing."""

    def run(inputs: list[np.ndarray]) -> list[tuple[Any, float]]:
        start = time.perf_counter()
        logits, embedding = engine.infer(np.stack(inputs))
        predictions = engine.predictions_from_outputs(logits, embedding)
        ms = (time.perf_counter() - start) * 1000.0
        return [(p, ms) for p in predictions]

    return run


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leaflens")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


def _add_drift_route(app: FastAPI, package_dir: Path, settings: ServeSettings) -> None:
    @app.get(
        "/v1/drift", summary="Drift of recent inputs against the training reference", tags=["monitoring"]
    )
    async def drift(request: Request, last_n: int = 1000) -> JSONResponse:
        _state(request)
        if settings.summaries_path is None:
            raise ApiError(409, "no_summaries", "input summaries are off (serve.summaries.enabled=false)")
        try:  # Evidently, pandas and scikit-learn: only where the training extra is installed, and only here
            from leaflens.ops.drift import check_drift
        except ImportError as err:
            raise ApiError(
                501,
                "drift_unavailable",
                f"drift checks need `pip install leaflens[train]` ({err.name} missing)",
            ) from err
        try:
            result = await run_in_threadpool(
                check_drift,
                package_dir,
                settings.summaries_path,
                last_n=max(1, last_n),
                options=settings.drift,
            )
        except (FileNotFoundError, ValueError) as err:
            raise ApiError(409, "drift_unavailable", str(err)) from err
        return JSONResponse(jsonable_encoder(result))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.code, err.message, err.filename)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "too_large_request" if err.status_code == 413 else _http_code(err.status_code)
        return _error(err.status_code, code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        # A bug, not bad input: log the traceback and answer in the same JSON shape.
        logger.opt(exception=err).error("Unhandled error on {} {}", request.method, request.url.path)
        return _error(500, "internal_error", f"internal error ({type(err).__name__}); see the server log")


def _http_code(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


def _add_routes(app: FastAPI, settings: ServeSettings, metrics: ServingMetrics) -> None:
    async def predict_one(
        state: ServiceState, data: bytes, filename: str | None
    ) -> tuple[schemas.Prediction, np.ndarray, Any]:
        rgb, model_input = await _decode(data, filename, settings, metrics, state.engine.spec)
        prediction, ms = await state.batcher.submit(model_input)
        metrics.observe_prediction(prediction.best.name, prediction.confidence, prediction.abstain)
        info = state.model_info
        out = _to_schema(prediction, filename, rgb, info.version, ms, state.engine.threshold)
        return out, rgb, prediction

    def summarise(background: BackgroundTasks, state: ServiceState, rgb: np.ndarray, prediction: Any) -> None:
        if state.store is not None:
            background.add_task(
                _record_summary,
                state.store,
                rgb,
                prediction,
                state.model_info.version,
                settings.store_raw_images,
            )

    @app.post(
        "/v1/predict",
        response_model=schemas.Prediction,
        summary="Diagnose one leaf photo",
        tags=["predict"],
    )
    async def predict(
        request: Request,
        background: BackgroundTasks,
        file: Annotated[UploadFile | None, File(description="The photo (JPEG, PNG, WebP, ...).")] = None,
        explain: Annotated[bool, Query(description="Add a Grad-CAM overlay (PNG data URL).")] = False,
    ) -> schemas.Prediction:
        state = _state(request)
        if file is None:
            raise ApiError(
                422, "missing_file", _missing_file_message("file", request, await _form_keys(request))
            )
        data = await _read_upload(file, settings)
        out, rgb, prediction = await predict_one(state, data, file.filename)
        if explain:
            try:
                out.explanation = await run_in_threadpool(
                    _explain, state.engine.package.dir, rgb, prediction.best.class_id
                )
            except (ImportError, OSError, ValueError, RuntimeError) as err:
                # The diagnosis stands; say why the overlay is missing instead of failing the request.
                logger.warning("Grad-CAM failed: {}", err)
                out.explanation_error = f"{type(err).__name__}: {err}"
        summarise(background, state, rgb, prediction)
        return out

    @app.post(
        "/v1/predict/batch",
        response_model=schemas.BatchResponse,
        summary="Diagnose several leaf photos",
        description="Each file gets its own result or error, in upload order; one bad file does not fail the "
        "others.",
        tags=["predict"],
    )
    async def predict_batch(
        request: Request,
        background: BackgroundTasks,
        files: Annotated[
            list[UploadFile] | None, File(description="The photos, one field 'files' each.")
        ] = None,
    ) -> schemas.BatchResponse:
        state = _state(request)
        if not files:
            raise ApiError(
                422, "missing_file", _missing_file_message("files", request, await _form_keys(request))
            )
        if len(files) > settings.max_batch_files:
            raise ApiError(
                413,
                "too_many_files",
                f"{len(files)} files sent; at most {settings.max_batch_files} per batch request",
            )

        async def one(upload: UploadFile) -> schemas.BatchItem:
            try:
                data = await _read_upload(upload, settings)
                out, rgb, prediction = await predict_one(state, data, upload.filename)
            except ApiError as err:
                detail = schemas.ErrorDetail(code=err.code, message=err.message, filename=upload.filename)
                return schemas.BatchItem(filename=upload.filename, error=detail)
            summarise(background, state, rgb, prediction)
            return schemas.BatchItem(filename=upload.filename, prediction=out)

        results = list(await asyncio.gather(*(one(f) for f in files)))
        failed = sum(r.error is not None for r in results)
        return schemas.BatchResponse(results=results, succeeded=len(results) - failed, failed=failed)

    @app.get("/v1/model", response_model=schemas.ModelInfo, summary="The model being served", tags=["model"])
    async def model(request: Request) -> schemas.ModelInfo:
        return _state(request).model_info

    @app.get("/healthz", response_model=schemas.Health, summary="Liveness: the process answers", tags=["ops"])
    async def healthz() -> schemas.Health:
        return schemas.Health(status="ok")

    @app.get(
        "/readyz",
        response_model=schemas.Readiness,
        summary="Readiness: the model is loaded",
        tags=["ops"],
        responses={503: {"model": schemas.Readiness}},
    )
    async def readyz(request: Request) -> Response:
        state = getattr(request.app.state, "service", None)
        body = schemas.Readiness(
            ready=state is not None, model_version=state.model_info.version if state else None
        )
        return JSONResponse(body.model_dump(), status_code=200 if state is not None else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus_metrics() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
