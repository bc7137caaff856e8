"""The local HTTP API gateway builds API Gateway's payload 2.0 events and maps responses like it."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devtools.cfn_yaml import load_template
from devtools.gateway import LocalGateway, build_event, map_result
from devtools.lambda_context import LambdaContext

TIMEOUT = 10


class Recorder:
    def __init__(self, answer: Any = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.contexts: list[LambdaContext] = []
        self.answer = answer if answer is not None else {"statusCode": 200, "body": '{"ok":true}'}

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(event)
        self.contexts.append(context)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def gateway(recorder: Recorder, template: dict[str, Any]) -> Iterator[LocalGateway]:
    with LocalGateway(recorder, template, serialize=True) as gw:
        yield gw


def test_gateway_builds_a_payload_v2_event(gateway: LocalGateway, recorder: Recorder) -> None:
    # GIVEN a JSON POST with a query string, cookies and a repeated header
    body = '{"event":{"xdm":{}}}'
    headers = [("Content-Type", "application/json"), ("X-Dup", "a"), ("X-Dup", "b"), ("Cookie", "c1=v1; c2=v2")]
    # WHEN it is sent to POST /events
    with requests.Session() as session:
        req = requests.Request("POST", f"{gateway.url}/events?datastreamId=ds-2&x=1&x=2", data=body).prepare()
        for name, value in headers:
            req.headers[name] = value if name != "X-Dup" else "a, b"
        resp = session.send(req, timeout=TIMEOUT)
    # THEN the handler got the event API Gateway builds
    assert resp.status_code == 200
    assert resp.json() == {"ok": True}
    assert resp.headers["apigw-requestid"]
    (event,) = recorder.events
    assert event["version"] == "2.0"
    assert event["routeKey"] == "POST /events"
    assert event["rawPath"] == "/events"
    assert event["rawQueryString"] == "datastreamId=ds-2&x=1&x=2"
    assert event["queryStringParameters"] == {"datastreamId": "ds-2", "x": "1,2"}
    assert event["cookies"] == ["c1=v1", "c2=v2"]
    assert "cookie" not in event["headers"]
    assert event["headers"]["content-type"] == "application/json"
    assert event["headers"]["content-length"] == str(len(body))
    assert all(k == k.lower() for k in event["headers"])
    assert event["body"] == body
    assert event["isBase64Encoded"] is False
    assert "pathParameters" not in event
    ctx = event["requestContext"]
    assert ctx["http"]["method"] == "POST"
    assert ctx["http"]["path"] == "/events"
    assert ctx["http"]["sourceIp"] == "127.0.0.1"
    assert ctx["http"]["protocol"] == "HTTP/1.1"
    assert ctx["stage"] == "$default"
    assert ctx["routeKey"] == "POST /events"
    assert ctx["requestId"] == resp.headers["apigw-requestid"]
    assert isinstance(ctx["timeEpoch"], int)
    assert {"accountId", "apiId", "domainName", "domainPrefix", "time"} <= set(ctx)
    # AND a fresh Lambda context with the template's function timeout
    assert 0 < recorder.contexts[0].get_remaining_time_in_millis() <= 30_000


def test_gateway_joins_duplicate_headers_with_commas() -> None:
    event = build_event(
        method="POST",
        raw_path="/events",
        raw_query="",
        headers=[("X-Dup", "a"), ("x-dup", "b"), ("Content-Type", "application/json")],
        body=b"{}",
        route_key="POST /events",
        source_ip="127.0.0.1",
    )
    assert event["headers"]["x-dup"] == "a,b"
    assert "queryStringParameters" not in event
    assert "cookies" not in event


def test_gateway_base64_encodes_binary_bodies(gateway: LocalGateway, recorder: Recorder) -> None:
    resp = requests.post(
        f"{gateway.url}/events",
        data=b"\x00\x01binary",
        headers={"content-type": "application/octet-stream"},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200
    event = recorder.events[-1]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\x00\x01binary"
    assert "queryStringParameters" not in event


def test_gateway_answers_404_for_undeclared_routes(gateway: LocalGateway, recorder: Recorder) -> None:
    for method, path in (("GET", "/events"), ("POST", "/other"), ("POST", "/events/x")):
        resp = requests.request(method, f"{gateway.url}{path}", timeout=TIMEOUT)
        assert resp.status_code == 404
        assert resp.json() == {"message": "Not Found"}
    assert recorder.events == []


def test_gateway_answers_500_when_the_handler_raises(template: dict[str, Any]) -> None:
    with LocalGateway(Recorder(RuntimeError("secret detail")), template) as gw:
        resp = requests.post(f"{gw.url}/events", json={}, timeout=TIMEOUT)
    assert resp.status_code == 500
    assert resp.json() == {"message": "Internal Server Error"}
    assert "secret" not in resp.text


def test_gateway_answers_413_over_the_payload_limit(template: dict[str, Any]) -> None:
    handler = Recorder()
    with LocalGateway(handler, template, max_payload_bytes=1024) as gw:
        resp = requests.post(f"{gw.url}/events", data=b"x" * 2048, timeout=TIMEOUT)
    assert resp.status_code == 413
    assert handler.events == []


def test_gateway_writes_back_status_headers_cookies_and_base64_bodies(template: dict[str, Any]) -> None:
    answer = {
        "statusCode": 202,
        "headers": {"Content-Type": "application/problem+json", "X-Custom": "1"},
        "cookies": ["a=1; Path=/", "b=2"],
        "body": base64.b64encode(b'{"status":"queued"}').decode(),
        "isBase64Encoded": True,
    }
    with LocalGateway(Recorder(answer), template) as gw:
        resp = requests.post(f"{gw.url}/events", json={}, timeout=TIMEOUT)
    assert resp.status_code == 202
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.headers["x-custom"] == "1"
    assert resp.raw.headers.getlist("set-cookie") == ["a=1; Path=/", "b=2"]
    assert resp.json() == {"status": "queued"}


def test_gateway_infers_a_200_for_non_proxy_results() -> None:
    response = map_result({"hello": "world"})
    assert response.status == 200
    assert json.loads(response.body) == {"hello": "world"}


def test_gateway_keeps_connections_alive(gateway: LocalGateway, recorder: Recorder) -> None:
    with requests.Session() as session:
        for _ in range(3):
            resp = session.post(f"{gateway.url}/events", json={}, timeout=TIMEOUT)
            assert resp.status_code == 200
            assert resp.headers.get("Connection", "").lower() != "close"
        adapter = session.get_adapter(gateway.url)
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        pools = adapter.poolmanager.pools
        assert sum(pools[key].num_connections for key in pools.keys()) == 1  # the three went over one connection
    assert len(recorder.events) == 3


def test_gateway_runs_invocations_concurrently(template: dict[str, Any]) -> None:
    # GIVEN a handler that waits until two invocations are inside it at once
    barrier = threading.Barrier(2, timeout=5)

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        barrier.wait()
        return {"statusCode": 200, "body": "{}"}

    with LocalGateway(handler, template) as gw:
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(requests.post(f"{gw.url}/events", json={}, timeout=TIMEOUT).status_code)
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # THEN both completed (they overlapped in the handler)
    assert results == [200, 200]


def test_gateway_serializes_invocations_when_asked(template: dict[str, Any]) -> None:
    # GIVEN a serialized gateway and a handler that tracks how many invocations overlap
    lock = threading.Lock()
    active = [0, 0]  # current, maximum

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        threading.Event().wait(0.05)
        with lock:
            active[0] -= 1
        return {"statusCode": 200, "body": "{}"}

    with LocalGateway(handler, template, serialize=True) as gw:
        threads = [
            threading.Thread(target=requests.post, args=(f"{gw.url}/events",), kwargs={"timeout": TIMEOUT})
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # THEN they never overlapped
    assert active[1] == 1
