"""`make build`'s last check, `devtools.smoke_build`, catches what it is there to catch. `make build` runs it on what
`sam build` made, in python3.13; here it runs on a build put together from the source tree (the function's directory,
and a layer of this environment's packages), in this python, so that it can be broken on purpose."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from devtools.smoke_build import RUNTIME_PACKAGES, smoke
from devtools.stack import EVENTS_DIR, ROOT

pytestmark = pytest.mark.integration

FUNCTION_DIR = ROOT / "functions" / "relay"
THIS_RUNTIME = f"{sys.version_info[0]}.{sys.version_info[1]}"


def site_packages() -> Path:
    import requests

    return Path(requests.__file__).resolve().parent.parent


def fake_layer(target: Path, *, leave_out: Iterable[str] = ()) -> Path:
    """A layer linking every package of this environment but the runtime's own ones and `leave_out`."""
    skip = {*RUNTIME_PACKAGES, "six.py", *leave_out}
    target.mkdir()
    for entry in site_packages().iterdir():
        if entry.name not in skip and not entry.name.endswith(".pth"):
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return target


def test_a_complete_build_relays_every_sample_in_an_isolated_python(tmp_path: Path) -> None:
    # GIVEN the function's code and a layer with every package it needs
    layer = fake_layer(tmp_path / "layer")

    # WHEN the smoke check runs the samples through it in an isolated python
    problems = smoke(sys.executable, FUNCTION_DIR, layer, runtime=THIS_RUNTIME)

    # THEN it finds nothing wrong: every sample answered, acknowledged and stored delivered
    assert problems == []


def test_a_layer_missing_a_package_the_function_imports_fails_the_build(tmp_path: Path) -> None:
    # GIVEN a layer without standardwebhooks, which the webhook path imports (installed here, so every other test
    # would pass)
    layer = fake_layer(tmp_path / "layer", leave_out={"standardwebhooks"})

    # WHEN the smoke check runs the samples through it
    problems = smoke(sys.executable, FUNCTION_DIR, layer, runtime=THIS_RUNTIME)

    # THEN it names the missing module, and each webhook sample's event as stored nowhere
    assert any("No module named 'standardwebhooks'" in p for p in problems), problems
    for sample in EVENTS_DIR.glob("webhook-*.json"):
        webhook_id = json.loads(sample.read_text())["headers"]["webhook-id"]
        assert f"event {webhook_id} is stored nowhere, not delivered" in problems, (sample.name, problems)


def test_a_build_run_on_another_python_than_the_templates_fails(tmp_path: Path) -> None:
    # GIVEN a complete build, run on this python, and a template whose runtime is another one
    layer = fake_layer(tmp_path / "layer")

    # WHEN the smoke check runs
    problems = smoke(sys.executable, FUNCTION_DIR, layer, runtime="3.99")

    # THEN the python is named; the samples themselves were delivered
    assert problems == [f"the built function ran on python {THIS_RUNTIME}, not the template's 3.99"]
