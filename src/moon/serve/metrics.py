"""The service's Prometheus metrics, in a registry of its own (`GET /metrics`).

Routes are labelled by their template (`/v1/items/{item_id}/vector`), never by the path a client
sent, so an item id cannot grow the number of series.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        disable_created_metrics()  # the *_created series only restate the start time, once per label set
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moon_requests", "HTTP requests answered, by route and status", ("route", "status"),
                                registry=r)
        self.errors = Counter("moon_request_errors", "HTTP requests answered with a 4xx or 5xx status, by route and "
                              "status", ("route", "status"), registry=r)
        self.latency = Histogram("moon_request_duration_seconds", "time to answer a request, by route", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("moon_embed_queue_size", "inputs waiting to be embedded or being embedded", registry=r)
        self.batches = Histogram("moon_embed_batch_size", "inputs per forward pass of the micro-batcher",
                                 buckets=BATCH_BUCKETS, registry=r)
        self.version = Gauge("moon_active_version_info", "the store version being served (value 1)",
                             ("version", "model"), registry=r)
        self.reloads = Counter("moon_reloads", "version loads, by result (ok, failed)", ("result",), registry=r)
        self.reload_seconds = Histogram("moon_reload_duration_seconds", "time to load and self-test a version",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.index_items = Gauge("moon_index_items", "items searchable at the full dimension, by part (base: the "
                                 "saved or built index; delta: items added since)", ("part",), registry=r)
        self.added_items = Counter("moon_realtime_items", "items added through /v1/admin/items", registry=r)

    def served(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def now_serving(self, version: str, model: str, base: int, delta: int) -> None:
        self.version.clear()
        self.version.labels(version, model).set(1)
        self.index_items.labels("base").set(base)
        self.index_items.labels("delta").set(delta)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
