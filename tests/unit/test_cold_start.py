"""Cold start (issue 5): importing the handler does no client, secret or configuration work (no runtime is built) and
does not load the webhook stack (Event Handler, Standard Webhooks), which an SQS batch never needs."""

from __future__ import annotations

import json

from tests.unit.conftest import fresh_interpreter

PROBE = """
import json, sys
import relay.handler as h
print(json.dumps({
    "runtime_built": h._runtime is not None,
    "webhook_stack": sorted(m for m in ("relay.webhook", "standardwebhooks", "aws_lambda_powertools.event_handler")
                            if m in sys.modules),
}))
"""


def test_importing_the_handler_builds_nothing_and_needs_no_configuration():
    # GIVEN an environment with none of the function's variables (any configuration work at import would fail)
    # WHEN the handler module is imported in a fresh interpreter
    done = fresh_interpreter(PROBE)

    # THEN it imported cleanly, built no runtime (no clients, secrets or settings), and left the webhook stack out
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"runtime_built": False, "webhook_stack": []}


def test_a_log_level_powertools_refuses_does_not_break_the_import_and_is_reported_as_configuration():
    # GIVEN a POWERTOOLS_LOG_LEVEL that Powertools' Logger would refuse (it raises at construction)
    probe = (
        "import relay.handler as h\n"
        "from relay.errors import ConfigurationError\n"
        "try:\n"
        "    h.lambda_handler({'Records': []}, None)\n"
        "except ConfigurationError as exc:\n"
        "    print(exc.problems['POWERTOOLS_LOG_LEVEL'])\n"
    )

    # WHEN the handler is imported and invoked in a fresh interpreter
    done = fresh_interpreter(probe, POWERTOOLS_LOG_LEVEL="LOUD")

    # THEN the import worked and the invocation's configuration error names the variable
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
