"""Logger and metrics singletons. Log facts as keyword fields; never secrets, tokens, bodies or identity values."""

from __future__ import annotations

import threading

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

logger = Logger(service="interact-relay", use_rfc3339=True)
metrics = Metrics(namespace="InteractRelay", service="interact-relay")

_metrics_lock = threading.Lock()


def count(name: str, value: float = 1) -> None:
    """Thread-safe counter metric (batch records are processed on a thread pool)."""
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def timing(name: str, milliseconds: float) -> None:
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 1))
