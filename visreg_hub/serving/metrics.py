"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from visreg_hub.errors import require_extra

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request counts by route and status, latency histograms, batch sizes, queue depth, items, failures."""

    def __init__(self) -> None:
        prometheus = require_extra("prometheus_client", "serve")
        self.registry = prometheus.CollectorRegistry()
        self.content_type = prometheus.CONTENT_TYPE_LATEST
        self._generate = prometheus.generate_latest
        self.requests = prometheus.Counter(
            "visreg_requests_total",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = prometheus.Histogram(
            "visreg_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = prometheus.Histogram(
            "visreg_batch_size",
            "images per model forward pass",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = prometheus.Histogram(
            "visreg_batch_seconds",
            "seconds per model forward pass",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = prometheus.Gauge(
            "visreg_queue_depth", "images waiting for a model batch", ["model"], registry=self.registry
        )
        self.items_embedded = prometheus.Counter(
            "visreg_items_embedded_total", "images embedded", ["model"], registry=self.registry
        )
        self.decode_failures = prometheus.Counter(
            "visreg_decode_failures_total",
            "inputs that could not be decoded as images",
            registry=self.registry,
        )
        self.rejected = prometheus.Counter(
            "visreg_rejected_total", "requests refused by a limit", ["limit"], registry=self.registry
        )

    def render(self) -> bytes:
        return self._generate(self.registry)
