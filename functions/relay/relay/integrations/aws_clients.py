"""The only place boto3 clients are built. Endpoints come from boto3's own AWS_ENDPOINT_URL[_<SERVICE>] variables."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config


def client_config(pool_size: int) -> Config:
    return Config(
        connect_timeout=2,
        read_timeout=5,
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=max(pool_size, 10),
        tcp_keepalive=True,
    )


def build_clients(pool_size: int) -> dict[str, Any]:
    """One session, three clients; built on the first event of an execution environment, never at import."""
    session = boto3.session.Session()
    config = client_config(pool_size)
    return {name: session.client(name, config=config) for name in ("dynamodb", "secretsmanager", "sqs")}
