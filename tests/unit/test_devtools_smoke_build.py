"""How `devtools.smoke_build` reads its child's report (the child itself runs in the integration tests and in
`make build`)."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.smoke_build import problems_in, template_runtime

WEBHOOK: dict[str, Any] = {"headers": {}, "body": "{}"}
SQS: dict[str, Any] = {"Records": [{}]}
EVENTS: list[dict[str, Any]] = [SQS, WEBHOOK]


def report(**changes: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "python": "3.13",
        "answers": [{"batchItemFailures": []}, {"statusCode": 200, "body": "{}"}],
        "error": None,
        "modules": {"relay.handler": "function", "requests": "layer", "boto3": "runtime", "json": "stdlib"},
    }
    return {**good, **changes}


def test_the_template_runtime_is_the_version_the_child_must_report() -> None:
    assert template_runtime() == "3.13"


def test_a_good_report_has_no_problems() -> None:
    assert problems_in(report(), EVENTS, "3.13") == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"python": "3.11"}, "ran on python 3.11, not the template's 3.13"),
        ({"error": "Traceback ...\nModuleNotFoundError: No module named 'x'"}, "No module named 'x'"),
        (
            {"modules": {"relay.handler": "function", "yaml": "/usr/lib/python3/dist-packages/yaml/__init__.py"}},
            "modules imported from outside the build and the runtime: yaml (/usr/lib/python3/dist-packages/",
        ),
        ({"modules": {"relay.handler": "layer"}}, "relay.handler came from 'layer', not the built function"),
        (
            {"answers": [{"batchItemFailures": [{"itemIdentifier": "m1"}]}, {"statusCode": 200}]},
            "an SQS sample was not acknowledged",
        ),
        ({"answers": [{"batchItemFailures": []}, {"statusCode": 503}]}, "a webhook sample was answered 503, not 200"),
        ({"answers": [{"batchItemFailures": []}]}, "1 answers to 2 events"),
    ],
)
def test_each_kind_of_problem_is_named(changes: dict[str, Any], expected: str) -> None:
    found = problems_in(report(**changes), EVENTS, "3.13")
    assert any(expected in line for line in found), found
