"""Logger and metrics singletons. Log facts as keyword fields; never secrets, tokens, bodies or identity values."""

from __future__ import annotations

import json
import os
import sys
import threading

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.constants import MAX_METRICS

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


def _add(name: str, unit: MetricUnit, value: float) -> None:
    """Add a value, thread-safe (batch records are processed on a thread pool).

    Powertools writes the metric set out by itself once a metric holds MAX_METRICS (100) values, or the set that many
    metrics, which a batch of 100 reaches (one `EdgeLatency` per Edge attempt): with `print`, two writes (the document,
    then the newline), between which another worker's log line can land. CloudWatch reads a log event as EMF only if
    it is one JSON object, so that document's values, and the log line, would be lost: in an Edge outage, when the
    alarms need them. So the set is written here first, as one line in one write, while no log line can be written.
    """
    with _metrics_lock:
        held = metrics.metric_set.get(name)
        if (len(held["Value"]) if held else len(metrics.metric_set)) >= MAX_METRICS - 1:
            _write_metric_set()
        metrics.add_metric(name=name, unit=unit, value=value)


def _write_metric_set() -> None:
    """Write out the metric set as one EMF line and clear it, as Powertools' own flush at MAX_METRICS does (the
    dimensions stay). Under the log handler's lock, which every log line is written under."""
    document = metrics.serialize_metric_set()
    metrics.metric_set.clear()
    if is_metrics_disabled():
        return
    line = json.dumps(document, separators=(",", ":")) + "\n"
    handler = logger.registered_handler
    handler.acquire()
    try:
        sys.stdout.write(line)
        sys.stdout.flush()
    finally:
        handler.release()


def write_metrics_now() -> None:
    """Write out what the metric set holds (one EMF line), for an invocation that may not reach its end: a function
    that times out is stopped without running the handler's `finally`, and the metrics it held would be lost."""
    with _metrics_lock:
        if metrics.metric_set:
            _write_metric_set()


def count(name: str, value: float = 1) -> None:
    """A counter metric (thread-safe)."""
    _add(name, MetricUnit.Count, value)


def timing(name: str, milliseconds: float) -> None:
    """A duration metric in milliseconds (thread-safe)."""
    _add(name, MetricUnit.Milliseconds, round(milliseconds, 1))
