"""openapi.yaml describes `POST /events` exactly: it is a valid OpenAPI document, and its responses are the
statuses the webhook code can answer (contract §7 plus 409), each with the right media type and schema."""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from relay import errors, webhook
from relay.clock import SystemClock
from relay.errors import EdgeRejected, EdgeUnavailable, StoreUnavailable
from relay.integrations.edge import EdgeAnswer
from relay.integrations.store import Claim
from relay.process_event import Relay
from relay.settings import load_settings
from relay.webhook import WebhookApp

from tests.fakes import FakeEdge, FakeStore
from tests.unit.test_security_properties import FakeQueue, http_event

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "openapi.yaml"

# The statuses `POST /events` can answer (README's table): contract §7 plus 409, and 404 for any other route.
WEBHOOK_STATUSES = {200, 202, 400, 401, 404, 409, 413, 422, 502, 503}
PROBLEM_STATUSES = WEBHOOK_STATUSES - {200, 202}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def operation(spec: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = spec["paths"]["/events"]["post"]
    return op


def test_openapi_document_is_valid(spec: dict[str, Any]) -> None:
    validate(spec)
    assert list(spec["paths"]) == ["/events"]
    assert list(spec["paths"]["/events"]) == ["post"]


def literal_statuses_in_webhook() -> set[int]:
    """Every status literal the webhook module answers with: first arguments of problem()/ok(), and the
    literal statuses `rejected_response` maps a stored rejection to."""
    tree = ast.parse(Path(webhook.__file__).read_text(encoding="utf-8"))
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("problem", "ok"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, int):
                found.add(first.value)
        if isinstance(node, ast.FunctionDef) and node.name == "rejected_response":
            for inner in ast.walk(node):
                if isinstance(inner, ast.IfExp):
                    for branch in (inner.body, inner.orelse):
                        if isinstance(branch, ast.Constant) and isinstance(branch.value, int):
                            found.add(branch.value)
    return found


def test_webhook_code_answers_only_documented_statuses() -> None:
    found = literal_statuses_in_webhook()
    # InvalidEvent subclasses answer with their own `status` attribute (400, 413).
    found |= {errors.InvalidEvent.status, errors.PayloadTooLarge.status}
    assert found == WEBHOOK_STATUSES


def function_statuses(operation: dict[str, Any]) -> set[int]:
    """The statuses openapi.yaml documents as the function's (`default` is API Gateway's own answers)."""
    return {int(code) for code in operation["responses"] if code != "default"}


def test_openapi_responses_equal_the_webhook_statuses(operation: dict[str, Any]) -> None:
    assert function_statuses(operation) == WEBHOOK_STATUSES


def test_api_gateways_own_answers_are_documented_apart_with_what_to_retry(
    spec: dict[str, Any], operation: dict[str, Any]
) -> None:
    # API Gateway answers other routes, throttling, a failed function and a timeout itself, as {"message": ...}: a
    # sender's generated client must find a schema for them, not expect a problem document
    default = operation["responses"]["default"]
    assert default["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GatewayMessage"}
    assert spec["components"]["schemas"]["GatewayMessage"]["required"] == ["message"]
    for status in ("404", "413", "429", "500", "503"):
        assert status in default["description"], status
    # and every status the function answers says whether to send it again: the final ones as such (a sender that
    # retries every non-2xx, as Standard Webhooks senders do, must be told to stop), the others when
    responses = operation["responses"]
    for code in ("200", "202", "400", "404", "413", "422", "502"):
        assert "Final" in responses[code]["description"], code
    assert "retry after `Retry-After`" in responses["409"]["description"]
    assert "must retry after `Retry-After`" in responses["503"]["description"]
    assert "then resend" in responses["401"]["description"]


def test_error_responses_are_problem_json(spec: dict[str, Any], operation: dict[str, Any]) -> None:
    responses = operation["responses"]
    for code in PROBLEM_STATUSES:
        content = responses[str(code)]["content"]
        assert list(content) == ["application/problem+json"], code
    for code in (200, 202):
        assert list(responses[str(code)]["content"]) == ["application/json"], code
    problem = spec["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    validation = spec["components"]["schemas"]["ValidationProblem"]["allOf"][1]
    assert validation["required"] == ["errors"]
    assert validation["properties"]["errors"]["items"]["required"] == ["path", "message"]
    for code in (409, 503):
        assert responses[str(code)]["headers"]["Retry-After"]["required"] is True


def test_request_schema_is_the_interact_event(spec: dict[str, Any], operation: dict[str, Any]) -> None:
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    schema = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert schema["type"] == "object" and schema["required"] == ["event"]
    assert schema.get("additionalProperties", True) is not False
    event = schema["properties"]["event"]
    assert event["required"] == ["xdm"] and event["properties"]["xdm"]["type"] == "object"
    for key in ("query", "meta"):
        assert schema["properties"][key]["type"] == "object"
    assert event["properties"]["data"]["type"] == "object"
    params = {(p["in"], p["name"]): p for p in operation["parameters"]}
    assert set(params) == {
        ("query", "datastreamId"),
        ("query", "dataStreamId"),  # the spelling Edge takes too, read the same
        ("header", "webhook-id"),
        ("header", "webhook-timestamp"),
        ("header", "webhook-signature"),
    }
    assert params[("query", "datastreamId")]["required"] is False
    assert params[("query", "dataStreamId")]["required"] is False


# ---------------------------------------------------------------------------------- every answer against its schema

BODY = b'{"event":{"xdm":{"_id":"e1"}}}'
ANSWERED = EdgeAnswer(200, {"requestId": "r-1", "handle": [{"type": "state:store", "payload": []}]}, 1)


class RefusingQueue:
    def send(self, inbound: Any, *, delay_s: float | None = None) -> bool:
        return False


def edge_problem(status: int, **fields: Any) -> EdgeRejected:
    problem = {"type": "https://ns.adobe.com/aep/errors/EXEG-0104-422", "title": "T", "status": status, **fields}
    return EdgeRejected(status, problem)  # the status stored is the HTTP one (`problem_from`)


def hand_built(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    event = http_event(BODY)
    change(event)
    return event


def without_raw_path(event: dict[str, Any]) -> None:
    event.pop("rawPath")


def as_get(event: dict[str, Any]) -> None:
    event["requestContext"]["http"]["method"] = "GET"
    event["routeKey"] = "GET /events"


REUSED = {"status": "delivered", "identityId": "another", "datastreamId": "ds-1", "eventId": "e1"}
DELIVERED_BEFORE = {
    "status": "delivered",
    "identityId": "",
    "datastreamId": "ds-1",
    "eventId": "e1",
    "requestId": "r-0",
    "handle": [{"type": "identity:result", "payload": []}],
}

# name: (the Lambda event, the store's claim answer, Edge's script, whether the queue takes it, the status expected)
SCENARIOS: dict[str, tuple[dict[str, Any], Any, tuple[Any, ...], bool, int]] = {
    "delivered": (http_event(BODY), None, (ANSWERED,), True, 200),
    "delivered-without-request-id": (http_event(BODY), None, (EdgeAnswer(200, {"handle": []}, 1),), True, 200),
    "delivered-207": (
        http_event(BODY),
        None,
        (EdgeAnswer(207, {"requestId": "r", "handle": [], "errors": [{"code": "x"}]}, 1),),
        True,
        200,
    ),
    "repeat-of-a-delivered-event": (http_event(BODY), Claim(False, existing=DELIVERED_BEFORE), (), True, 200),
    "a-webhook-id-over-256-characters": (
        http_event(b'{"event":{"xdm":{}}}', {"webhook-id": "m" * 300}),
        None,
        (ANSWERED,),
        True,
        200,
    ),
    "state-entries-null": (
        http_event(b'{"event":{"xdm":{"_id":"e1"}},"meta":{"state":{"entries":null}}}'),
        None,
        (ANSWERED,),
        True,
        200,
    ),
    "empty-datastream-query": (http_event(BODY, query="datastreamId="), None, (), True, 400),
    "edge-unavailable": (http_event(BODY), None, (EdgeUnavailable("edge answered 503", retry_after=5),), True, 202),
    "store-unavailable-at-the-claim": (http_event(BODY), StoreUnavailable("dynamodb failed"), (), True, 202),
    "not-json": (http_event(b"not json"), None, (), True, 400),
    "no-xdm": (http_event(b'{"event":{}}'), None, (), True, 400),
    "bad-datastream": (http_event(BODY, query="datastreamId=a,b"), None, (), True, 400),
    "hand-built-body-not-a-string": (hand_built(lambda e: e.update(body={"event": {}})), None, (), True, 400),
    "hand-built-without-raw-path": (hand_built(without_raw_path), None, (), True, 400),
    "busy": (http_event(BODY), Claim(False, existing={"status": "pending"}), (), True, 409),
    "too-large": (http_event(b'{"event":{"xdm":{"_id":"e1","x":"' + b"a" * 70_000 + b'"}}}'), None, (), True, 413),
    "edge-rejected-400": (http_event(BODY), None, (edge_problem(400, detail="d"),), True, 422),
    "edge-rejected-with-null-type": (http_event(BODY), None, (edge_problem(400, type=None, detail=None),), True, 422),
    "edge-rejected-with-an-object-title": (http_event(BODY), None, (edge_problem(403, title={"x": 1}),), True, 422),
    "edge-redirected-301": (http_event(BODY), None, (edge_problem(301),), True, 422),
    "eventid-reused": (http_event(BODY), Claim(False, existing=REUSED), (), True, 422),
    "edge-500": (http_event(BODY), None, (edge_problem(500, detail="d"),), True, 502),
    "edge-501": (http_event(BODY), None, (edge_problem(501),), True, 502),
    "edge-unavailable-and-not-queued": (http_event(BODY), None, (EdgeUnavailable("edge answered 503"),), False, 503),
    "store-unavailable-and-not-queued": (http_event(BODY), StoreUnavailable("dynamodb failed"), (), False, 503),
    "another-route": (hand_built(as_get), None, (), True, 404),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_answer_is_the_one_openapi_describes(name: str, spec: dict[str, Any], operation: dict[str, Any]) -> None:
    # GIVEN a webhook scenario (signature checks off: they are tested elsewhere; 401 has no body but the problem)
    event, claim, edge_script, queue_takes_it, expected = SCENARIOS[name]
    settings = load_settings(
        {
            "HANDLES_TABLE": "handles",
            "DATASTREAM_ID": "ds-1",
            "EDGE_AUTH": "none",
            "EDGE_BASE_URL": "https://edge.adobedc.net",
            "WEBHOOK_AUTH": "none",
        }
    )
    store = FakeStore() if claim is None else FakeStore(claim_result=claim)
    relay = Relay(store, FakeEdge(*edge_script), SystemClock())  # type: ignore[arg-type]
    queue = FakeQueue() if queue_takes_it else RefusingQueue()
    app = WebhookApp(settings, relay, lambda: None, lambda: queue, SystemClock())  # type: ignore[arg-type,return-value]

    # WHEN the function answers it
    answer = app.handle(copy.deepcopy(event), None)

    # THEN the status is the expected one, and openapi.yaml documents it: media type, headers, body schema
    assert answer["statusCode"] == expected, answer
    documented = operation["responses"][str(expected)]
    [(media, content)] = documented["content"].items()
    headers = {k.lower(): v for k, v in (answer.get("headers") or {}).items()}
    assert headers["content-type"] == media
    for header, spec_of in (documented.get("headers") or {}).items():
        if spec_of.get("required"):
            assert re.fullmatch(spec_of["schema"]["pattern"], headers[header.lower()]), header
    schema = {"components": spec["components"], **content["schema"]}
    problems = [e.message for e in OAS30Validator(schema).iter_errors(json.loads(answer["body"]))]
    assert problems == [], answer["body"]


@pytest.mark.parametrize(
    ("problem", "answered"),
    [
        ({"type": None, "title": None, "detail": None}, ("about:blank", "Edge rejected the event", "")),
        ({"type": 7, "title": {"x": 1}, "detail": ["a", 2]}, ("7", '{"x": 1}', '["a", 2]')),
        ({"type": "https://ns.adobe.com/x", "title": "T", "detail": "d"}, ("https://ns.adobe.com/x", "T", "d")),
    ],
    ids=["null", "not-text", "text"],
)
def test_an_edge_problem_s_fields_are_answered_as_text(problem: dict[str, Any], answered: tuple[str, ...]) -> None:
    # GIVEN a stored Edge rejection whose problem fields are null, or not text (a proxy's answer, an odd Edge one)
    item = {"eventId": "e1", "status": "rejected", "error": {**problem, "status": 400}}

    # WHEN it is answered
    body = json.loads(str(webhook.rejected_response(item).body))

    # THEN each is text: nothing for null, JSON for anything else
    assert (body["type"], body["title"], body["detail"]) == answered


def test_every_documented_status_has_a_scenario(operation: dict[str, Any]) -> None:
    assert {s for *_, s in SCENARIOS.values()} == function_statuses(operation) - {401}


@pytest.mark.parametrize("name", [n for n, (*_, status) in SCENARIOS.items() if status in (200, 202)])
def test_every_request_the_relay_takes_is_one_openapi_allows(
    name: str, spec: dict[str, Any], operation: dict[str, Any]
) -> None:
    # GIVEN a request the relay takes (answered 200 or 202)
    event = SCENARIOS[name][0]
    body = json.loads(event["body"])
    query = dict(pair.partition("=")[::2] for pair in event.get("rawQueryString", "").split("&") if pair)
    headers = {k.lower(): v for k, v in event["headers"].items()}

    # THEN openapi.yaml allows its body, its query and its headers
    body_schema = {
        "components": spec["components"],
        **operation["requestBody"]["content"]["application/json"]["schema"],
    }
    assert [e.message for e in OAS30Validator(body_schema).iter_errors(body)] == []
    for param in operation["parameters"]:
        value = query.get(param["name"]) if param["in"] == "query" else headers.get(param["name"].lower())
        if value is not None:
            assert [e.message for e in OAS30Validator(param["schema"]).iter_errors(value)] == [], param["name"]


def test_an_empty_datastream_the_relay_refuses_openapi_refuses_too(operation: dict[str, Any]) -> None:
    # GIVEN the relay's answer to `?datastreamId=` (400: taken for absent, it went to the default datastream)
    assert SCENARIOS["empty-datastream-query"][-1] == 400

    # THEN openapi.yaml does not allow it either, under either spelling, nor say it counts as omitted
    for param in operation["parameters"]:
        if param["name"] in ("datastreamId", "dataStreamId"):
            assert list(OAS30Validator(param["schema"]).iter_errors("")) != [], param["name"]
            assert "counts as omitted" not in json.dumps(param)
