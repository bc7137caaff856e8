"""openapi.yaml describes `POST /events` exactly: it is a valid OpenAPI document, and its responses are the
statuses the webhook code can answer (contract §7 plus 409), each with the right media type and schema."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate
from relay import errors, webhook

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "openapi.yaml"

# The statuses `POST /events` can answer (README's table): contract §7 plus 409.
WEBHOOK_STATUSES = {200, 202, 400, 401, 409, 413, 422, 502, 503}
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
    # 404 answers requests for other routes (API Gateway itself answers those before the function sees them).
    found = literal_statuses_in_webhook() - {404}
    # InvalidEvent subclasses answer with their own `status` attribute (400, 413).
    found |= {errors.InvalidEvent.status, errors.PayloadTooLarge.status}
    assert found == WEBHOOK_STATUSES


def test_openapi_responses_equal_the_webhook_statuses(operation: dict[str, Any]) -> None:
    assert {int(code) for code in operation["responses"]} == WEBHOOK_STATUSES


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
        ("header", "webhook-id"),
        ("header", "webhook-timestamp"),
        ("header", "webhook-signature"),
    }
    assert params[("query", "datastreamId")]["required"] is False
