"""Logger and metrics singletons. Log facts as keyword fields; never secrets, tokens, bodies or identity values."""

from __future__ import annotations

import os
import threading

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from relay.settings import valid_log_level

# A level Powertools would refuse must not fail the import: the logger starts at INFO and `load_settings` names the
# variable in the invocation's configuration error, with every other bad one.
_level = os.environ.get("POWERTOOLS_LOG_LEVEL", "")
# The service names the deployment (the template sets the stack name): the metrics' `service` dimension, which its
# alarms and dashboard read, so that two stacks in one account and region never mix their metrics.
SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "interact-relay"
logger = Logger(service=SERVICE, use_rfc3339=True, level=None if valid_log_level(_level or "INFO") else "INFO")
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "InteractRelay", service=SERVICE)

_metrics_lock = threading.Lock()


def count(name: str, value: float = 1) -> None:
    """Thread-safe counter metric (batch records are processed on a thread pool)."""
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def timing(name: str, milliseconds: float) -> None:
    with _metrics_lock:
        metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(milliseconds, 1))
