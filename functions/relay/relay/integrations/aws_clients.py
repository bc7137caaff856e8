"""The only place boto3 clients are built. Endpoints come from boto3's own AWS_ENDPOINT_URL[_<SERVICE>] variables."""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config


def client_config(pool_size: int) -> Config:
    return Config(
        connect_timeout=2,
        read_timeout=5,
        retries={"mode": "standard", "max_attempts": 5},  # retries: 6 attempts in all (README, "Time budget")
        max_pool_connections=max(pool_size, 10),
        tcp_keepalive=True,
        # Requests are built by this code, not by users: skip botocore's per-call parameter validation (CPU).
        parameter_validation=False,
    )


# Secrets are read while the token lock is held and inside an event's deadline: a stalled Secrets Manager must fail
# within seconds (2 attempts x (1 s connect + 2 s read) plus one backoff: about 7 s at worst), not 6 x 7 s.
# SQS is called only when something already went wrong (Edge down: a webhook's fallback; a long Retry-After: records
# postponed), late in an invocation: 2 short attempts (0.5 s connect, 1 s read) plus one backoff stay within about
# SQS_WORST_CASE_S, so a stalled SQS cannot outlast the Lambda timeout (a webhook still gets its 503 problem).
SQS_WORST_CASE_S = 4.0
_SERVICE_CONFIG = {
    "secretsmanager": Config(connect_timeout=1, read_timeout=2, retries={"mode": "standard", "total_max_attempts": 2}),
    "sqs": Config(connect_timeout=0.5, read_timeout=1, retries={"mode": "standard", "total_max_attempts": 2}),
}


class AwsClients(dict[str, Any]):
    """Clients by service name, each created on first use: an SQS batch never builds the SQS client it does not
    need (the retry queue is only for webhooks), which keeps the cold start short."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self._config = client_config(pool_size)
        self._session: boto3.session.Session | None = None
        self._lock = threading.Lock()

    def __missing__(self, service: str) -> Any:
        with self._lock:  # batch workers may ask at once
            if service not in self:
                if self._session is None:
                    self._session = boto3.session.Session()
                config = self._config.merge(_SERVICE_CONFIG[service]) if service in _SERVICE_CONFIG else self._config
                self[service] = self._session.client(service, config=config)  # type: ignore[call-overload]
            return dict.__getitem__(self, service)


def build_clients(pool_size: int) -> AwsClients:
    """One session; built on the first event of an execution environment, never at import."""
    return AwsClients(pool_size)
