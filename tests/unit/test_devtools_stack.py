"""LocalStack's own lifecycle (against a real moto server and the simulator)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import requests

from devtools.stack import LocalStack

pytestmark = pytest.mark.integration


class _Interrupted(BaseException):
    """Stands for pytest-timeout's failure, raised in whatever the main thread is doing."""


def test_a_stop_interrupted_halfway_still_restores_the_environment_and_stops_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A CI run once hit the soak test's timeout while its stack waited for moto to exit: the environment kept
    # pointing at that stack's servers, and every later integration test failed against them.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9/before")
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    stack = LocalStack().start()
    moto_stop = stack.moto.stop

    def interrupted_moto_stop(timeout: float = 10.0) -> None:
        moto_stop(timeout)
        raise _Interrupted

    try:
        stack.apply_env(overrides={"AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:9/proxy"})
        assert os.environ["AWS_ENDPOINT_URL"] == stack.moto.url
        sim_url = stack.sim.url
        stack.moto.stop = interrupted_moto_stop  # type: ignore[method-assign]
        with pytest.raises(_Interrupted):
            stack.stop()
    finally:
        moto_stop()
        stack.sim.stop()

    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9/before"
    assert "AWS_ENDPOINT_URL_DYNAMODB" not in os.environ
    with pytest.raises(requests.ConnectionError):  # the simulator, stopped after moto's stop was interrupted
        requests.get(sim_url, timeout=2)


def test_importing_the_stack_loads_none_of_the_relay_before_its_environment_is_applied() -> None:
    # The relay's logger takes its service name at import: loaded before `apply_env`, the local stack's log lines
    # said "interact-relay" while `make serve` printed POWERTOOLS_SERVICE_NAME=interact-relay-local
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "import sys, devtools.stack; print(sorted(m for m in sys.modules if m.split('.')[0] == 'relay'))"
    env = {"PYTHONPATH": f"{root / 'functions' / 'relay'}:{root}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_can_bring_failing_records_back_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN `make serve RETRY_SECONDS=5` (the queue's 180-s visibility timeout makes a failing event take 15 minutes to
    # reach the dead-letter queue)
    from devtools import stack as stack_module

    made: list[Any] = []

    class Stack:
        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

        def __enter__(self) -> Stack:
            return self

        def __exit__(self, *_: Any) -> None:
            pass

    monkeypatch.setattr(stack_module, "LocalStack", Stack)
    monkeypatch.setattr(stack_module, "serve", lambda _: None)
    monkeypatch.setattr(stack_module, "stop_on_sigterm", lambda: None)

    # WHEN / THEN the stack's poller hands failed records back for 5 s; by default, for the queue's own timeout
    assert stack_module.main(["--serve", "--retry-seconds", "5"]) == 0
    assert stack_module.main(["--serve"]) == 0
    assert made == [{"failure_visibility_timeout": 5}, {"failure_visibility_timeout": None}]
