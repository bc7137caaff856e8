"""README's configuration table against what the code reads and what template.yaml sets: every variable the settings
read is documented, each row's "in template.yaml" column says what the template does, and each numeric default is
the one the settings apply; and README's snippet that reads a stored result back does what it says."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from relay import codec
from relay.integrations.store import HandlesStore, decode_item

from devtools.cfn_yaml import load_template
from devtools.resources import create_handles_table

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "functions" / "relay" / "relay" / "settings.py"


def config_rows() -> dict[str, tuple[str, str]]:
    """variable -> (the "in template.yaml" cell, its default cell); a row naming two variables gives each its part of
    a default written as `a` / `b`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        where, default = cells[-2], cells[-1]
        parts = default.split(" / ") if len(names) > 1 else [default]
        assert len(parts) == len(names), line
        rows.update({name: (where, part) for name, part in zip(names, parts, strict=True)})
    return rows


def settings_variables() -> dict[str, int | None]:
    """Every variable the function reads -> its integer default (None when it is not an `_int`): those
    `load_settings` reads, and those any module reads from `os.environ` itself (the logger's and metrics')."""
    source = SETTINGS.read_text(encoding="utf-8")
    read = set(re.findall(r'(?:env\.get|required|choice)\(\s*"([A-Z][A-Z0-9_]+)"', source))
    for module in SETTINGS.parent.rglob("*.py"):
        read |= set(re.findall(r'os\.environ(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]+)"', module.read_text(encoding="utf-8")))
    ints = {name: int(default) for name, default in re.findall(r'_int\(problems, env, "([A-Z0-9_]+)", (\d+),', source)}
    defaults: dict[str, int | None] = dict.fromkeys(read)
    return defaults | ints


def template_environment() -> dict[str, Any]:
    template = load_template(ROOT / "template.yaml")
    env = dict(template["Globals"]["Function"]["Environment"]["Variables"])
    env.update(template["Resources"]["RelayFunction"]["Properties"]["Environment"]["Variables"])
    return env


def test_every_variable_the_settings_read_is_in_the_readme_table() -> None:
    assert set(settings_variables()) - set(config_rows()) == set()
    assert set(config_rows()) - set(settings_variables()) == set()


@pytest.mark.parametrize("name", sorted(config_rows()))
def test_the_readme_says_what_the_template_sets(name: str) -> None:
    where, _ = config_rows()[name]
    env = template_environment()
    if where == "not set":
        assert name not in env
        return
    assert name in env, where
    value = env[name]
    if (ref := re.fullmatch(r"(?:parameter|the stack's) `([\w:]+)`", where)) is not None:
        assert f"{{'Ref': '{ref[1]}'}}" in repr(value), (where, value)
    else:
        fixed = re.match(r"fixed: `([^`]+)`", where)
        assert fixed is not None, where
        assert value == fixed[1]


@pytest.mark.parametrize("name", sorted(n for n, d in settings_variables().items() if d is not None))
def test_the_readme_gives_the_default_the_settings_apply(name: str) -> None:
    _, default = config_rows()[name]
    assert default == f"`{settings_variables()[name]}`"


def test_the_readme_snippet_reads_a_stored_result_back_as_plain_json(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a delivered result stored as the relay stores it (a compressed handle, numbers), and README's snippet
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = next(
        block
        for block in re.findall(r"```python\n(.*?)```", text, re.S)
        if "def doc(attr)" in block and "get_item(" in block
    )
    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "results")
    handle = [{"type": "identity:result", "payload": [{"id": "x" * 2000}]}]  # over 1 KiB: stored compressed
    item = {
        **HandlesStore.result_key("ev-1"),
        "eventId": {"S": "ev-1"},
        "status": {"S": "delivered"},
        "handle": codec.encode_json(handle),
        "attempts": {"N": "1"},
        "expiresAt": {"N": "1798458239"},
    }
    assert "B" in item["handle"]
    ddb.put_item(TableName="results", Item=item)

    # WHEN the snippet runs, with its placeholders filled in
    code = snippet.replace("<TableName output>", "results").replace("<eventId>", "ev-1")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet, on an in-process moto

    # THEN it prints the result as plain JSON: documents decoded, numbers as numbers (what relayctl shows)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(decode_item(item)))
    assert (printed["attempts"], printed["handle"]) == (1, handle)


def unexpected_error_counts() -> list[tuple[str, int, list[str]]]:
    """Each `count("UnexpectedErrors")` in the function: (file, line, the messages logged in the same block)."""
    found: list[tuple[str, int, list[str]]] = []
    for path in sorted((ROOT / "functions" / "relay" / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for field in ("body", "handlers", "orelse", "finalbody"):
                block = getattr(node, field, None)
                if not isinstance(block, list) or not all(isinstance(s, ast.stmt) for s in block):
                    continue
                calls = [c for s in block if isinstance(s, ast.Expr) and isinstance(c := s.value, ast.Call)]
                counted = [
                    c
                    for c in calls
                    if getattr(c.func, "id", None) == "count"
                    and c.args
                    and isinstance(c.args[0], ast.Constant)
                    and c.args[0].value == "UnexpectedErrors"
                ]
                messages = [
                    str(c.args[0].value)
                    for c in calls
                    if isinstance(c.func, ast.Attribute)
                    and getattr(c.func.value, "id", None) == "logger"
                    and c.args
                    and isinstance(c.args[0], ast.Constant)
                ]
                found += [(path.name, c.lineno, messages) for c in counted]
    return found


def test_every_unexpected_error_counted_is_logged_where_the_runbook_looks() -> None:
    # docs/operations.md (unexpected-errors) sends the operator to `filter message like /unexpected error/`: every
    # count of the alarm's metric must log a line that filter finds, beside it (one was once logged without it)
    runbook = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "filter message like /unexpected error/" in runbook
    counts = unexpected_error_counts()
    assert len(counts) >= 10  # the walk finds them (11 when written)
    for name, line, messages in counts:
        assert any("unexpected error" in m for m in messages), f"{name}:{line} logs {messages}"


def test_the_readmes_first_events_are_events_edge_takes() -> None:
    # The first-deploy check sends two events through the stack: each must be one the relay sends on and Edge takes
    # from a server (a primary identity: without one Edge refuses it, EXEG-0306-400), or the check fails on every
    # correct deployment and its 422 points at the datastream.
    from relay.models import read_event

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("**A first event**", 1)[1].split("\n```\n", 1)[0]
    bodies = re.findall(r"--(?:message-)?body '(\{.*?\})'", section)
    assert len(bodies) == 2, bodies
    for n, body in enumerate(bodies, 1):
        inbound = read_event(
            body, "fallback", datastream=None, default_datastream="ds", source="sqs", received_at=0, identity_key=None
        )
        assert inbound.event_id == f"first-event-{n}"
        assert inbound.primary_identity is not None, body
