"""Prometheus metrics, correct under multi-worker gunicorn.

Each gunicorn worker is a separate process, so per-process counters would make ``/metrics``
answer with whichever worker caught the scrape.  When ``PROMETHEUS_MULTIPROC_DIR`` is set (the
gunicorn config sets it to a fresh directory under the data dir before forking workers, and
marks dead workers in ``child_exit``), values are written to mmap files there and ``/metrics``
aggregates them with a ``MultiProcessCollector``.  Without it (a single process), the default
registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

ACTIVATIONS = Counter("layerlock_activations_total", "Activation requests by outcome", ["outcome"])
ACTIVATION_SECONDS = Histogram("layerlock_activation_seconds", "Activation latency",
                               buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LICENSES_ISSUED = Counter("layerlock_licenses_issued_total", "Licenses issued")
REJECTED = Counter("layerlock_rejected_total",
                   "Requests refused before any principal was identified (not audited one by one)", ["reason"])
REQUESTS = Counter("layerlock_http_requests_total", "HTTP requests by status class", ["status"])
#: A commit whose audit record had to be re-hashed because another commit moved the chain head
#: first (store/commit.py): the price of one unforked chain under concurrency, one round trip each.
AUDIT_HEAD_RACES = Counter("layerlock_audit_head_races_total",
                           "Commits re-hashed because another commit moved the audit chain head first")
GRANTED = ACTIVATIONS.labels(outcome="granted")  # the hot path: the labelled child looked up once


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
