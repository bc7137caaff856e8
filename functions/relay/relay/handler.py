"""Lambda entry point: builds one Runtime per execution environment on the first event, then dispatches."""

from __future__ import annotations

from typing import Any

from relay.runtime import Runtime
from relay.settings import get_settings

_runtime: Runtime | None = None


def new_runtime() -> Runtime:
    """A fresh execution environment (tests use this to simulate a cold start)."""
    return Runtime(get_settings())


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _runtime
    if _runtime is None:
        _runtime = new_runtime()
    return _runtime.handle(event, context)
