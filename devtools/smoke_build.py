"""`make build`'s last check: what `sam build` made, run as Lambda would run it, before anyone deploys it.

Every other test runs the relay from the source tree on this machine's default python3 with the development
packages installed. This runs the built function (`.aws-sam/build/RelayFunction`) with its built layer
(`.aws-sam/build/DepsLayer/python`) in the Lambda runtime's python (the template's `Runtime`, python3.13), isolated
(`-I -S -B`: no site packages, no PYTHON* variables), with only the packages the Lambda runtime adds itself (boto3,
botocore, s3transfer, dateutil, six, jmespath, urllib3: this machine's copies, linked into a temporary directory;
the layer's own copies come first, as in Lambda). So a module the
function imports that the layer does not ship, or code that only the newer python rejects, fails here instead of
on the first event in AWS.

It starts the local stack (Edge simulator, moto), hands every sample in `events/` to the built handler in one child
process (webhook samples re-signed with the stack's secret), and checks: the child's python is the template's
runtime; every module imported came from the function, the layer, the runtime's packages or the standard library
(not the interpreter's own site-packages);
every webhook sample was answered 200 and every SQS record acknowledged; every sample's event is stored `delivered`.

    .venv/bin/python -m devtools.smoke_build --python "$(command -v python3.13)" .aws-sam/build
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from devtools.invoke import signed
from devtools.run_demo import event_id_of
from devtools.stack import DATASTREAM_ID, EVENTS_DIR, ROOT, LocalStack

CHILD = Path(__file__).with_name("built_function_child.py")
# What the Lambda runtime puts on sys.path itself: boto3 and what it imports.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "dateutil", "six", "jmespath", "urllib3")
ALLOWED_ORIGINS = {"function", "layer", "runtime", "stdlib", "platstdlib"}
CHILD_TIMEOUT_S = 300


def template_runtime(template: Path = ROOT / "template.yaml") -> str:
    """The function's `Runtime` in the template (`python3.13`), as the version the child must report (`3.13`)."""
    from devtools.cfn_yaml import load_template
    from devtools.resources import function_property

    return str(function_property(load_template(template), "Runtime")).removeprefix("python")


def link_runtime_packages(target: Path, names: Iterable[str] = RUNTIME_PACKAGES) -> None:
    """Link this interpreter's copies of the runtime's own packages into `target` (they are pure python)."""
    import importlib.util

    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise SystemExit(f"smoke_build: {name} is not installed here (make setup installs it)")
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (target / source.name).symlink_to(source, target_is_directory=source.is_dir())


def sample_events(stack: LocalStack) -> tuple[list[dict[str, Any]], list[str]]:
    """Every sample in `events/` (webhook ones re-signed, body and webhook-id kept), and the eventIds each stores."""
    events, event_ids = [], []
    for path in sorted(EVENTS_DIR.glob("*.json")):
        event = json.loads(path.read_text(encoding="utf-8"))
        if "Records" in event:
            event_ids += [event_id_of(record["body"], record["messageId"]) for record in event["Records"]]
        else:
            event = signed(event, stack.webhook_secret)
            event_ids.append(event_id_of(event["body"], event["headers"]["webhook-id"]))
        events.append(event)
    return events, event_ids


def problems_in(report: dict[str, Any], events: Sequence[dict[str, Any]], runtime: str) -> list[str]:
    """What is wrong with the child's report: its python, where its modules came from, its answers."""
    found = []
    if report.get("python") != runtime:
        found.append(f"the built function ran on python {report.get('python')}, not the template's {runtime}")
    if report.get("error"):
        found.append(f"the built function failed:\n{report['error']}")
    modules: dict[str, str] = report.get("modules") or {}
    strays = sorted(f"{name} ({origin})" for name, origin in modules.items() if origin not in ALLOWED_ORIGINS)
    if strays:
        found.append(f"modules imported from outside the build and the runtime: {', '.join(strays[:5])}")
    if modules.get("relay.handler") != "function":
        found.append(f"relay.handler came from {modules.get('relay.handler')!r}, not the built function")
    answers = report.get("answers") or []
    for event, answer in zip(events, answers, strict=False):
        if "Records" in event:
            if answer != {"batchItemFailures": []}:
                found.append(f"an SQS sample was not acknowledged: {answer}")
        elif not isinstance(answer, dict) or answer.get("statusCode") != 200:
            status = answer.get("statusCode") if isinstance(answer, dict) else answer
            found.append(f"a webhook sample was answered {status}, not 200")
    if not report.get("error") and len(answers) != len(events):
        found.append(f"{len(answers)} answers to {len(events)} events")
    return found


def smoke(python: str, function_dir: Path, layer_dir: Path, *, runtime: str | None = None) -> list[str]:
    """Run every sample through the built function in `python`; the problems found (none: it works)."""
    runtime = runtime or template_runtime()
    with tempfile.TemporaryDirectory(prefix="relay-runtime-") as scratch, LocalStack() as stack:
        runtime_dir = Path(scratch)
        link_runtime_packages(runtime_dir)
        stack.apply_env()
        events, event_ids = sample_events(stack)
        request = {"timeout": stack.resources.function_timeout, "events": events}
        try:
            child = subprocess.run(
                [python, "-I", "-S", "-B", str(CHILD), str(function_dir), str(layer_dir), str(runtime_dir)],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                env=dict(os.environ),
                timeout=CHILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return [f"the built function did not finish the samples in {CHILD_TIMEOUT_S} s"]
        lines = child.stdout.strip().splitlines()
        try:
            report = json.loads(lines[-1]) if lines else None
        except ValueError:
            report = None
        if child.returncode != 0 or not isinstance(report, dict):
            return [f"the child exited {child.returncode} without a report:\n{child.stderr[-2000:]}"]
        found = problems_in(report, events, runtime)
        for event_id in event_ids:
            item = stack.result_item(event_id) or {}
            status, datastream = item.get("status"), item.get("datastreamId")
            if status != "delivered":
                found.append(f"event {event_id} is stored {status or 'nowhere'}, not delivered")
            elif datastream != DATASTREAM_ID:
                found.append(f"event {event_id} was delivered to datastream {datastream}, not {DATASTREAM_ID}")
        return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.smoke_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("build_dir", type=Path, help="sam build's output (.aws-sam/build)")
    parser.add_argument("--python", required=True, help="the Lambda runtime's python (python3.13)")
    args = parser.parse_args(argv)
    function_dir, layer_dir = args.build_dir / "RelayFunction", args.build_dir / "DepsLayer" / "python"
    for path in (function_dir / "relay", layer_dir):
        if not path.is_dir():
            print(f"smoke_build: {path} is missing: run sam build first (make build)", file=sys.stderr)
            return 2
    runtime = template_runtime()
    found = smoke(args.python, function_dir, layer_dir, runtime=runtime)
    for line in found:
        print(f"make build: {line}", file=sys.stderr)
    if not found:
        print(f"built function on python{runtime}: every sample in events/ delivered (function + layer only)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
