"""Prometheus metrics of the service, in a registry of its own per app (tests build many apps in a process).

Requests are labelled by route *template* (``/v1/predict``, not the raw URL) so that a scan of random URLs
cannot blow up the number of time series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServingMetrics:
    """Every metric the service exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "leaflens_http_requests_total", "HTTP requests.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "leaflens_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "leaflens_batch_size", "Images per inference engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.predicted_class = Counter(
            "leaflens_predictions_total", "Top-1 predictions by class.", ["class_name"], registry=r
        )
        self.confidence = Histogram(
            "leaflens_prediction_confidence",
            "Calibrated top-1 probability.",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.not_sure = Counter("leaflens_not_sure_total", 'Predictions answered "not sure".', registry=r)
        self.input_errors = Counter(
            "leaflens_input_errors_total", "Inputs refused, by reason.", ["reason"], registry=r
        )
        self.model_load_seconds = Gauge(
            "leaflens_model_load_seconds", "Time to load and verify the model package.", registry=r
        )
        self.model_info = Gauge(
            "leaflens_model_info", "The loaded model package (value 1).", ["version", "sha256"], registry=r
        )
        # process_cpu_seconds_total, process_resident_memory_bytes...: what one request costs the server.
        ProcessCollector(registry=r)

    def observe_prediction(self, class_name: str, confidence: float, not_sure: bool) -> None:
        self.predicted_class.labels(class_name=class_name).inc()
        self.confidence.observe(confidence)
        if not_sure:
            self.not_sure.inc()

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Pure ASGI middleware: count and time every HTTP request by method, route template and status.


    Args:
        app: The wrapped ASGI app.
        metrics: Where to count.
        skip: Route templates not to count (``/metrics`` itself).
        templates: Known route templates (paths without parameters), to label answers sent before routing
            (a 413 for a too large body) by their route rather than as ``unmatched``.
        prefixes: Mount points (``/static``) that label every path under them.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServingMetrics,
        skip: Iterable[str] = (),
        templates: Iterable[str] = (),
        prefixes: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.skip = set(skip)
        self.templates = set(templates)
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route(scope)
            if route not in self.skip:
                labels = {"method": scope.get("method", ""), "route": route, "status": str(status)}
                self.metrics.requests.labels(**labels).inc()
                self.metrics.latency.labels(**labels).observe(time.perf_counter() - start)

    def _route(self, scope: Scope) -> str:
        template = getattr(scope.get("route"), "path", None)
        if template:
            return str(template)
        path = str(scope.get("path", ""))
        if path in self.templates:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix + "/"):
                return prefix
        return "unmatched"
