"""LocalStack's own lifecycle (against a real moto server and the simulator)."""

from __future__ import annotations

import os

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
