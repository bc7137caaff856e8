"""relayctl as a new user meets it: usage mistakes refused before anything is touched (a redrive from the dead-letter
queue to itself, a limit that is not positive, a `--since` it cannot read), what a limited or `--since` listing
says, a closed stdout (`| head`), local AWS client configuration named as such, the identity key secret named as it
was given, redrive without a table, the identity value read from stdin; and devtools.invoke's one-line refusal of a
missing event file."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from relay import codec
from relay.identity_state import opaque_identity_id
from relay.models import iso_millis
from relay.process_event import INVALID_EVENT_TYPE

import relayctl.__main__ as relayctl_main
from devtools import invoke
from devtools.resources import create_handles_table
from tests.unit.test_relayctl_replay import rejected_item

DLQ = "https://sqs.us-east-1.amazonaws.com/123456789012/relay-dlq"


def no_client(service: str, **_: Any) -> Any:
    raise AssertionError(f"{service} was called")


def rejected(event_id: str, stored_at: str) -> dict[str, Any]:
    return {**rejected_item(event_id), "source": {"S": "sqs"}, "storedAt": {"S": stored_at}}


def table_with_rejections(n: int) -> Any:
    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "t")
    for k in range(n):
        ddb.put_item(TableName="t", Item=rejected(f"ev-{k}", f"2025-01-0{k + 1}T00:00:00.000Z"))
    return ddb


# -- 1. redrive from a queue to itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue_url", [DLQ, DLQ + "/", f"  {DLQ} ", DLQ.replace(urlsplit(DLQ).netloc, "queue.amazonaws.com")]
)
def test_redrive_refuses_a_queue_url_that_is_the_dead_letter_queue_itself(
    queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN --queue-url naming the dead-letter queue (as given, with a trailing slash, with spaces around it, or by
    # SQS's legacy host)
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)

    # WHEN a redrive is asked for
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["--table", "t", "--queue-url", queue_url, "--dlq-url", DLQ, "redrive", "--max", "1000"])

    # THEN it is refused before any message is read: it would send each message back to the queue it came from (and,
    # with --max 1000, the same one up to 1000 times)
    assert "--queue-url and --dlq-url name the same queue" in str(refused.value.code)


def test_redrive_from_a_queue_to_itself_moves_nothing(aws: None) -> None:
    # GIVEN one message in the dead-letter queue
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"event": {"xdm": {"_id": "e1"}}}))

    # WHEN a redrive names it as both queues
    with pytest.raises(SystemExit):
        relayctl_main.main(["--table", "t", "--queue-url", dlq + "/", "--dlq-url", dlq, "redrive", "--max", "5"])

    # THEN the dead-letter queue holds that one message, visible, and no copy of it
    attrs = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["All"])["Attributes"]
    assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("1", "0")


# -- 2. rejected --limit, --since ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        *(("--limit", limit, "is not a positive whole number") for limit in ("0", "-1", "two")),  # -1 dropped a row
        *(
            ("--since", since, "is neither a time ago (30m, 2h, 7d) nor an ISO 8601 time")
            for since in ("2 hours", "yesterday", "2w", "2025-13-01")
        ),
    ],
)
def test_rejected_refuses_an_option_value_it_cannot_read(
    option: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a client that must not be used
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)

    # WHEN the listing is asked for with a limit that is not a positive whole number, or since something that is
    # neither a time ago nor an ISO 8601 time
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["--table", "t", "rejected", option, value])

    # THEN argparse refuses it as a usage error, saying what it takes
    assert refused.value.code == 2
    assert f"argument {option}: {value!r} {says}" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--to-datastream", "--from-datastream"])
def test_replay_takes_only_a_datastream_id_the_relay_would_take(
    option: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a client that must not be used
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)

    # WHEN a replay names a datastream the relay would refuse (nothing is marked, nothing sent)
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["--table", "t", "--queue-url", "q", "replay", "--all-rejected", option, "not a ds"])

    # THEN argparse refuses it as a usage error, saying what it takes
    assert refused.value.code == 2
    assert f"argument {option}: must be a datastream id" in capsys.readouterr().err


def test_replaying_every_rejection_to_one_datastream_needs_the_one_to_move_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a client that must not be used
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)

    # WHEN every rejection would go to one datastream (schema errors in healthy datastreams too), THEN it is refused
    with pytest.raises(SystemExit, match="--all-rejected with --to-datastream needs --from-datastream"):
        relayctl_main.main(["--table", "t", "--queue-url", "q", "replay", "--all-rejected", "--to-datastream", "ds-1"])


def test_rejected_says_when_its_limit_hides_events_and_which_it_shows(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 6 rejected events, stored a day apart
    table_with_rejections(6)

    # WHEN at most 2 are listed
    assert relayctl_main.main(["--table", "t", "rejected", "--limit", "2"]) == 0

    # THEN the two newest are listed (what an operator answering an alarm looks for; the latest last), and the last
    # line says that 4 more are hidden and how to see them
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:-1]] == ["ev-4", "ev-5"]
    assert lines[-1] == "showing the newest 2 of 6 rejected event(s): --limit N to list more, --json for all"


@pytest.mark.parametrize("since", ["2025-01-04", "2025-01-04T00:00Z", "2025-01-04T01:00:00+01:00"])
def test_rejected_since_a_time_lists_only_those_stored_from_then_on(
    since: str, aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 6 rejected events, stored a day apart from 2025-01-01 (UTC)
    table_with_rejections(6)

    # WHEN those since 2025-01-04, midnight UTC (a date, a time in UTC, a time with an offset), are listed, as a table
    # and as JSON
    assert relayctl_main.main(["--table", "t", "rejected", "--since", since, "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert relayctl_main.main(["--table", "t", "rejected", "--since", since, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)

    # THEN only the three stored from then on count, the first of them at that very moment included
    assert [line.split()[1] for line in lines[1:-1]] == ["ev-4", "ev-5"]
    assert lines[-1] == (
        "showing the newest 2 of 3 rejected event(s) since 2025-01-04T00:00:00.000Z: --limit N to list more, "
        "--json for all"
    )
    assert [r["eventId"] for r in listed] == ["ev-3", "ev-4", "ev-5"]


def test_rejected_since_a_time_ago_counts_back_from_now(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN events rejected 3 hours, 90 minutes and 1 minute ago
    ddb = table_with_rejections(0)
    now = time.time()
    for event_id, ago_s in (("ev-3h", 3 * 3600), ("ev-90m", 90 * 60), ("ev-1m", 60)):
        ddb.put_item(TableName="t", Item=rejected(event_id, iso_millis(now - ago_s)))

    # WHEN those of the last 2 hours, of the last 30 minutes, of the last day are listed
    def listed(since: str) -> list[str]:
        assert relayctl_main.main(["--table", "t", "rejected", "--since", since]) == 0
        return [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:-1]]

    # THEN each lists those stored since then
    assert (listed("2h"), listed("30m"), listed("1d")) == (["ev-90m", "ev-1m"], ["ev-1m"], ["ev-3h", "ev-90m", "ev-1m"])


@pytest.mark.parametrize("since", ["0001-01-01", "1969-12-31T23:59Z", "999999d"])
def test_rejected_since_before_1970_lists_them_all(since: str, aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN 3 rejected events
    table_with_rejections(3)

    # WHEN those since a time before any event could be stored are listed (before the epoch, which iso_millis
    # cannot write as a year of four digits)
    assert relayctl_main.main(["--table", "t", "rejected", "--since", since]) == 0

    # THEN all are listed
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:-1]] == ["ev-0", "ev-1", "ev-2"]


def test_rejected_counts_them_all_when_its_limit_hides_none(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN 3 rejected events
    table_with_rejections(3)

    # WHEN they are listed with a limit of exactly 3
    assert relayctl_main.main(["--table", "t", "rejected", "--limit", "3"]) == 0

    # THEN all three are listed, and the count says no more
    lines = capsys.readouterr().out.splitlines()
    assert (len(lines), lines[-1]) == (5, "3 rejected event(s)")


def test_rejected_says_what_to_fix_in_an_event_the_relay_refused(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the relay's refusals with field errors: one for a datastream the allowed list leaves out (and one more
    # error), one whose first error is long; and Edge's refusal, which has none
    ddb = table_with_rejections(0)
    not_listed = '"ds-x" is not one of the datastreams this relay sends to (ALLOWED_DATASTREAM_IDS)'
    problems = {
        "ev-ds": [{"path": "datastreamId", "message": not_listed}, {"path": "event.xdm", "message": "is required"}],
        "ev-long": [{"path": "event.xdm.identityMap", "message": "x" * 200}],
    }
    for n, (event_id, errors) in enumerate(problems.items()):
        problem = {"type": INVALID_EVENT_TYPE, "title": "Invalid event", "status": 400, "errors": errors}
        item = {**rejected(event_id, f"2025-01-0{n + 1}T00:00:00.000Z"), "error": codec.encode_json(problem)}
        ddb.put_item(TableName="t", Item=item)
    ddb.put_item(TableName="t", Item=rejected("ev-edge", "2025-01-03T00:00:00.000Z"))

    # WHEN they are listed
    assert relayctl_main.main(["--table", "t", "rejected"]) == 0

    # THEN each refusal by the relay says its first field error (cut at 100 characters) and how many more there are
    reasons = [line.split(None, 3)[3] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert reasons == [
        f"invalid-event: Invalid event (datastreamId: {not_listed}; 1 more)",
        f"invalid-event: Invalid event (event.xdm.identityMap: {'x' * 74}...)",
        "EXEG-0104-422: Unprocessable",
    ]


# -- 3. a closed stdout (`relayctl rejected --json | head`) -------------------------------------------------------


@pytest.mark.parametrize("argv", [["rejected", "--json"], ["rejected"], ["show", "ev-0"]])
def test_output_to_a_closed_pipe_ends_quietly_with_status_141(
    argv: list[str], aws: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN rejected events, and a stdout whose reader has gone (as `| head` leaves it once it has its lines)
    table_with_rejections(3)
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = open(write_end, "w", buffering=1, encoding="utf-8")  # line-buffered: each line reaches the pipe
    monkeypatch.setattr("sys.stdout", closed)

    # WHEN the command prints
    code = relayctl_main.main(["--table", "t", *argv])

    # THEN it ends with the status of a process SIGPIPE ended (128 + 13), one line on stderr saying so (a command may
    # have stopped part-way) and no traceback, and nothing left for the interpreter's final flush to fail on
    assert code == 141
    closed.close()
    assert (
        capsys.readouterr().err
        == f"relayctl: {argv[0]}: stopped, its output was closed (run it again to see or finish)\n"
    )


@pytest.mark.parametrize("stderr", ["same pipe", "closed"])
def test_output_to_a_closed_pipe_ends_with_141_even_when_stderr_is_gone_too(
    stderr: str, aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN rejected events, stdout on a pipe whose reader has gone, and stderr on the same pipe (`2>&1 | head`) or
    # closed (`2>&-`)
    table_with_rejections(3)
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = open(write_end, "w", buffering=1, encoding="utf-8")
    monkeypatch.setattr("sys.stdout", closed)
    monkeypatch.setattr("sys.stderr", closed if stderr == "same pipe" else None)

    # WHEN the command prints, THEN it still ends with 141, not with an exception (exit 1: "not all done")
    assert relayctl_main.main(["--table", "t", "rejected", "--json"]) == 141
    closed.close()


# -- 4. error messages --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "relayctl: AWS client not configured: You must specify a region. (set AWS_REGION or AWS_DEFAULT_REGION"),
        (
            {"AWS_DEFAULT_REGION": "us-east-1"},
            "relayctl: AWS client not configured: Unable to locate credentials (set AWS_PROFILE",
        ),
        (
            {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"},
            "relayctl: AWS client not configured: Partial credentials found in env, missing: AWS_SECRET_ACCESS_KEY",
        ),
        (
            {"AWS_DEFAULT_REGION": "us-east-1", "AWS_PROFILE": "no-such-profile"},
            "relayctl: AWS client not configured: The config profile (no-such-profile) could not be found (check",
        ),
    ],
)
def test_a_local_aws_client_configuration_problem_is_not_called_a_refusal_by_aws(
    env: dict[str, str],
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN no AWS configuration but `env` (no config or credentials file, no instance metadata), and a new session
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)

    # WHEN a command calls AWS
    code = relayctl_main.main(["--table", "t", "show", "ev-1"])

    # THEN the one line says the local setup is missing (AWS was never asked) and what to set; the exit code is an
    # AWS error's
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(says), err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("named", "says"),
    [
        ("flag", "relayctl: identity key secret arn:aws:secretsmanager:us-east-1:123456789012:secret:nope "
         "(--identity-key-secret) could not be read (ResourceNotFoundException)"),
        ("environment", "relayctl: identity key secret arn:aws:secretsmanager:us-east-1:123456789012:secret:nope "
         "(IDENTITY_KEY_SECRET_ID) could not be read (ResourceNotFoundException)"),
    ],
)  # fmt: skip
def test_forget_names_the_identity_key_secret_it_could_not_read_as_it_was_given(
    named: str, says: str, aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an identity key secret that does not exist, named by the flag or by the environment
    secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope"
    argv = ["--table", "t", "forget", "--namespace", "Email", "--id", "a@example.com"]
    if named == "flag":
        monkeypatch.delenv("IDENTITY_KEY_SECRET_ID", raising=False)
        argv += ["--identity-key-secret", secret]
    else:
        monkeypatch.setenv("IDENTITY_KEY_SECRET_ID", secret)

    # WHEN the operator forgets an identity
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(argv)

    # THEN the refusal names the secret and where it came from: the flag is not reported as the environment variable
    assert str(refused.value.code) == says


def test_redrive_needs_no_table_and_says_what_it_does_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN no table, queue or dead-letter queue configured
    for name in ("HANDLES_TABLE", "QUEUE_URL", "RETRY_QUEUE_URL", "DLQ_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)

    # WHEN a redrive is asked for
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["redrive"])

    # THEN the refusal names what redrive uses, not the table it never reads
    assert "redrive needs --queue-url and --dlq-url" in str(refused.value.code)


def test_redrive_runs_without_a_table(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN two queues, one message in the dead-letter queue, and no table configured
    monkeypatch.delenv("HANDLES_TABLE", raising=False)
    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    queue = sqs.create_queue(QueueName="q")["QueueUrl"]
    sqs.send_message(QueueUrl=dlq, MessageBody=json.dumps({"event": {"xdm": {"_id": "e1"}}}))

    # WHEN it is redriven
    code = relayctl_main.main(["--queue-url", queue, "--dlq-url", dlq, "redrive"])

    # THEN the message is moved
    assert code == 0
    moved = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages", [])
    assert [json.loads(m["Body"])["event"]["xdm"]["_id"] for m in moved] == ["e1"]


# -- 5. forget --id - ---------------------------------------------------------------------------------------------


class Reads:
    """A table client that records every read and finds nothing."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, dict[str, Any]]] = []

    def get_paginator(self, operation: str) -> Any:
        reads = self.reads

        class Paginator:
            def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
                reads.append((operation, kwargs))
                return [{"Items": []}]

        return Paginator()


@pytest.mark.parametrize("line", ["a@example.com\n", "a@example.com\r\n", "a@example.com"])
def test_forget_reads_the_identity_value_from_stdin_with_id_dash(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the value on standard input (not on the command line, where shell history and `ps` would keep it)
    table = Reads()
    monkeypatch.setattr(relayctl_main.boto3, "client", lambda service, **_: table)
    monkeypatch.delenv("IDENTITY_KEY_SECRET_ID", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(line))

    # WHEN the operator forgets `--id -`
    relayctl_main.main(["--table", "t", "forget", "--namespace", "Email", "--id", "-", "--no-identity-key"])

    # THEN the identity searched for is that value, its line ending dropped
    (query,) = [kwargs for op, kwargs in table.reads if op == "query"]
    opaque = opaque_identity_id("Email", "a@example.com")
    assert query["ExpressionAttributeValues"] == {":pk": {"S": f"IDENTITY#{opaque}"}}


@pytest.mark.parametrize("given", ["", "\n", "a@example.com\nb@example.com\n"])
def test_forget_refuses_an_empty_or_second_value_on_stdin(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN nothing, an empty line, or two values on standard input, and a client that must not be used
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)
    monkeypatch.setattr("sys.stdin", io.StringIO(given))

    # WHEN the operator forgets `--id -`
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["--table", "t", "forget", "--namespace", "Email", "--id", "-", "--no-identity-key"])

    # THEN nothing is read or deleted, and the refusal says what stdin must hold
    assert "--id -: standard input must hold the identity value on one line" in str(refused.value.code)


def test_forget_with_id_dash_and_stdin_closed_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN no standard input at all (`relayctl ... --id - <&-`), and a client that must not be used
    monkeypatch.setattr(relayctl_main.boto3, "client", no_client)
    monkeypatch.setattr("sys.stdin", None)

    # WHEN the operator forgets `--id -`, THEN a refusal saying what to do, not a traceback
    with pytest.raises(SystemExit) as refused:
        relayctl_main.main(["--table", "t", "forget", "--namespace", "Email", "--id", "-", "--no-identity-key"])
    assert "--id -: standard input is closed" in str(refused.value.code)


def test_forget_with_id_dash_at_a_terminal_asks_for_the_value_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a terminal on standard input
    table = Reads()
    monkeypatch.setattr(relayctl_main.boto3, "client", lambda service, **_: table)
    monkeypatch.delenv("IDENTITY_KEY_SECRET_ID", raising=False)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("typed@example.com\n"))
    asked: list[str] = []

    def getpass(prompt: str) -> str:
        asked.append(prompt)
        return "typed@example.com"

    monkeypatch.setattr(relayctl_main.getpass, "getpass", getpass)

    # WHEN the operator forgets `--id -`
    relayctl_main.main(["--table", "t", "forget", "--namespace", "Email", "--id", "-", "--no-identity-key"])

    # THEN the value is asked for without echo (getpass), and searched for
    assert asked == ["identity value (not shown): "]
    (query,) = [kwargs for op, kwargs in table.reads if op == "query"]
    opaque = opaque_identity_id("Email", "typed@example.com")
    assert query["ExpressionAttributeValues"] == {":pk": {"S": f"IDENTITY#{opaque}"}}


def test_forget_help_recommends_stdin_for_the_identity_value(capsys: pytest.CaptureFixture[str]) -> None:
    # WHEN a user reads forget's help
    with pytest.raises(SystemExit):
        relayctl_main.main(["forget", "--help"])

    # THEN it says how to keep the value off the command line
    text = " ".join(capsys.readouterr().out.split())
    assert '"-" reads it from standard input (one line): prefer this for personal data' in text


# -- 6. devtools.invoke with a missing event file (`make invoke EVENT=nope.json`) ----------------------------------


def test_invoke_names_a_missing_event_file_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the function's environment, and an event file that does not exist
    monkeypatch.setenv("HANDLES_TABLE", "t")
    missing = tmp_path / "nope.json"

    # WHEN it is invoked
    code = invoke.main([str(missing)])

    # THEN one line names the file, no traceback, and the exit code is a usage error's
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"python -m devtools.invoke: cannot read the event file {missing}: No such file or directory\n"


@pytest.mark.parametrize(
    ("env", "region"),
    [
        ({"AWS_REGION": "eu-west-1"}, "eu-west-1"),  # the README's `export AWS_REGION=...`, which boto3 alone ignores
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-1"}, "eu-west-1"),  # as the AWS CLI: AWS_REGION
        ({"AWS_DEFAULT_REGION": "us-east-1"}, "us-east-1"),
    ],
)
def test_relayctl_works_in_the_region_the_aws_cli_beside_it_uses(
    env: dict[str, str], region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a shell whose region is set as the README says (no profile region)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # WHEN relayctl makes its clients, THEN they are in that region
    for service in ("dynamodb", "sqs", "cloudformation", "secretsmanager"):
        assert relayctl_main._client(service).meta.region_name == region


# -- review "relayctl" (thirty-first landing) ----------------------------------------------------------------------


def datastream_refusal(event_id: str, raw: str) -> dict[str, Any]:
    """The relay's refusal of a body only because ALLOWED_DATASTREAM_IDS left out the default datastream (kept as the
    body's text), as `replay --to-datastream` may send on."""
    from relay.models import DEFAULT_NOT_ALLOWED

    problem = {
        "type": INVALID_EVENT_TYPE,
        "title": "Invalid event",
        "status": 400,
        "errors": [{"path": "datastreamId", "message": DEFAULT_NOT_ALLOWED}],
    }
    return {
        "pk": {"S": f"EVENT#{event_id}"},
        "sk": {"S": "RESULT"},
        "status": {"S": "rejected"},
        "rejectedBy": {"S": "relay"},
        "eventId": {"S": event_id},
        "datastreamId": {"S": "ds-default"},
        "source": {"S": "webhook"},
        "storedAt": {"S": iso_millis(1_700_000_000)},
        "error": codec.encode_json(problem),
        "request": codec.encode_json(raw),
    }


def test_a_replayed_body_kept_as_text_has_what_sqs_refuses_escaped(aws: None) -> None:
    # GIVEN a webhook body holding U+FFFF raw in a string (JSON may), refused for its datastream alone, kept as text
    ddb, sqs = boto3.client("dynamodb"), boto3.client("sqs")
    create_handles_table(ddb, "t")
    raw = json.dumps({"event": {"xdm": {"_id": "ev-1", "note": "a\uffffb"}}}, ensure_ascii=False)
    ddb.put_item(TableName="t", Item=datastream_refusal("ev-1", raw))
    queue = sqs.create_queue(QueueName="q")["QueueUrl"]

    # WHEN, the list fixed, it is replayed to the default datastream
    outcome = relayctl_main.replay_event(ddb, sqs, "t", queue, "ev-1", datastream="ds-default")

    # THEN it is queued as the relay queues every message: U+FFFF escaped (SQS refuses it raw: InvalidMessageContents;
    # moto does not), the same document
    assert outcome == "queued"
    (message,) = sqs.receive_message(QueueUrl=queue)["Messages"]
    assert "\uffff" not in message["Body"]
    assert json.loads(message["Body"]) == json.loads(raw)


def test_a_replay_the_relay_would_refuse_for_its_body_is_skipped_saying_why(aws: None) -> None:
    # GIVEN a body refused because the default datastream was left out of the list, which is invalid as well (the
    # datastream is checked first, so its other errors were never stored)
    ddb, sqs = boto3.client("dynamodb"), boto3.client("sqs")
    create_handles_table(ddb, "t")
    bad = {"event": {"xdm": {"_id": "ev-2", "identityMap": {"ECID": [{"id": "x", "authenticatedState": "bogus"}]}}}}
    ddb.put_item(TableName="t", Item=datastream_refusal("ev-2", json.dumps(bad)))
    queue = sqs.create_queue(QueueName="q")["QueueUrl"]

    # WHEN it is replayed to the default datastream
    outcome = relayctl_main.replay_event(ddb, sqs, "t", queue, "ev-2", datastream="ds-default")

    # THEN it is skipped, naming what the relay would refuse (sent, it would be refused again and left `queued`, with
    # every later run sending it again), and nothing is sent or marked
    assert outcome == (
        "skipped: the relay would refuse it (event.xdm.identityMap.ECID[0].authenticatedState: must be one of "
        '"ambiguous", "authenticated", "loggedOut"); the sender must send a corrected event'
    )
    assert "Messages" not in sqs.receive_message(QueueUrl=queue)
    assert (relayctl_main._get(ddb, "t", "ev-2") or {}).get("status") == "rejected"


def test_a_replay_whose_last_message_the_relay_refused_says_so(aws: None) -> None:
    # GIVEN an event marked by a replay to a datastream ALLOWED_DATASTREAM_IDS left out: the relay refused the
    # replayed message and told the mark (`invalidFiling`); nothing more is coming for it
    ddb, sqs = boto3.client("dynamodb"), boto3.client("sqs")
    create_handles_table(ddb, "t")
    item = {
        **rejected_item("ev-3"),
        "status": {"S": "queued"},
        "datastreamId": {"S": "ds-new"},
        "replayedAt": {"S": iso_millis(time.time() - 60)},
        "invalidFiling": {"S": "ev-3#invalid-0123456789abcdef"},
    }
    ddb.put_item(TableName="t", Item=item)
    queue = sqs.create_queue(QueueName="q")["QueueUrl"]

    # WHEN the operator shows it, then replays it again (the list fixed, or not)
    shown = relayctl_main._explain(relayctl_main._get(ddb, "t", "ev-3") or {}, time.time())
    outcome = relayctl_main.replay_event(ddb, sqs, "t", queue, "ev-3")

    # THEN both say the last replay's message was refused, and where its refusal is
    assert str(shown).endswith(
        "a message under this eventId was refused as invalid and kept as ev-3#invalid-0123456789abcdef: if that was "
        "this event's own message (a replay or a redelivery refused under a newer rule), nothing more is coming for "
        "it, so fix what it says (`relayctl show` it), then replay this event again"
    )
    assert outcome.startswith("queued (the last replay's message was refused, kept as ev-3#invalid-0123456789abcdef")


def test_show_finds_a_dead_letter_whose_body_starts_with_a_byte_order_mark(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a producer's event written with a UTF-8 byte-order mark (the relay ignores it and keys the event by its
    # xdm._id), dead-lettered: its item is `queued`
    ddb, sqs = boto3.client("dynamodb"), boto3.client("sqs")
    create_handles_table(ddb, "t")
    ddb.put_item(TableName="t", Item={**rejected_item("order-7"), "status": {"S": "queued"}})
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    sqs.send_message(QueueUrl=dlq, MessageBody='\ufeff{"event": {"xdm": {"_id": "order-7"}}}')

    # WHEN the operator asks about it
    assert relayctl_main.main(["--table", "t", "--dlq-url", dlq, "show", "order-7"]) == 0

    # THEN it is dead-lettered, not "waiting in the queue"
    assert json.loads(capsys.readouterr().out)["status"] == "dead-lettered"


def test_show_does_not_call_an_event_waiting_once_no_queue_can_still_hold_its_message(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an event given back 20 days ago, whose dead letter SQS has since deleted (14 days at most)
    ddb, sqs = boto3.client("dynamodb"), boto3.client("sqs")
    create_handles_table(ddb, "t")
    then = time.time() - 20 * 86400
    item = {
        **rejected_item("order-8"),
        "status": {"S": "queued"},
        "updatedAt": {"S": iso_millis(then)},
        "lastError": {"S": "edge answered 503"},
    }
    ddb.put_item(TableName="t", Item=item)
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]

    # WHEN the operator asks about it
    relayctl_main.main(["--table", "t", "--dlq-url", dlq, "show", "order-8"])

    # THEN they are told nothing is left to deliver it
    detail = json.loads(capsys.readouterr().out)["detail"]
    assert detail.startswith("its last attempt was longer ago than SQS keeps any message"), detail


def test_show_prints_the_result_when_the_dead_letter_queue_cannot_be_searched(
    aws: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a waiting event, and a role that may read the table but not receive from the dead-letter queue
    from botocore.exceptions import ClientError

    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "t")
    ddb.put_item(TableName="t", Item={**rejected_item("order-9"), "status": {"S": "queued"}})

    def denied(*_: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ReceiveMessage")

    monkeypatch.setattr(relayctl_main, "_peek_dlq", denied)

    # WHEN the operator asks about it
    code = relayctl_main.main(["--table", "t", "--dlq-url", DLQ, "show", "order-9"])

    # THEN the result is shown, saying the queue was not searched and why (it was exit 2 with nothing shown)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (doc["status"], doc["deadLetterQueue"]) == (
        "queued",
        "the dead-letter queue could not be searched (AccessDenied)",
    )


def test_an_id_too_long_for_a_dynamodb_key_is_looked_up_as_the_relay_keeps_it() -> None:
    # GIVEN a webhook-id of 3,000 characters: the relay keeps its event under the shortened id (`bounded_id`), and
    # DynamoDB refuses a key over 2,048 bytes, reads included (moto does not)
    from relay.models import bounded_id

    given = "w" * 3000

    class Table:
        def get_item(self, Key: dict[str, Any], **_: Any) -> dict[str, Any]:
            pk = Key["pk"]["S"]
            assert len(pk.encode()) <= 2048, "ValidationException: key too large"
            return {"Item": {"pk": {"S": pk}, "sk": {"S": "RESULT"}, "status": {"S": "delivered"}}}

    # WHEN / THEN it is found under that id
    assert relayctl_main._find(Table(), "t", given)[0] == bounded_id(given)


def test_rejected_counts_the_errors_the_relay_did_not_keep() -> None:
    # GIVEN a refusal of 80 field errors, kept as 50 and one saying how many more
    errors = [{"path": f"event.xdm.f{k}", "message": "is required"} for k in range(50)]
    doc = {
        "error": {
            "type": INVALID_EVENT_TYPE,
            "title": "Invalid event",
            "errors": [*errors, {"path": "$", "message": "and 30 more errors"}],
        }
    }

    # WHEN / THEN the line counts the 79 others
    assert relayctl_main._reason(doc).endswith("(event.xdm.f0: is required; 79 more)")


def test_an_event_id_cannot_forge_lines_of_relayctls_plain_output(
    aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a rejection whose eventId (the sender's to choose: the relay takes a line break in `xdm._id`) holds a line
    # break and a fake row after it, and a bidi override
    forged = "ev-x\n2099-01-01T00:00:00.000Z  ORDER-42    sqs      EXEG-0000: all fine \u202e"
    ddb = table_with_rejections(1)
    ddb.put_item(TableName="t", Item=rejected(forged, "2025-01-05T00:00:00.000Z"))

    # WHEN the operator lists the rejections
    assert relayctl_main.main(["--table", "t", "rejected"]) == 0

    # THEN each rejection is one line, the id's line break and override shown escaped
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines  # the header, two rejections, the count
    assert "ev-x\\n2099-01-01T00:00:00.000Z  ORDER-42" in lines[2] and "\\u202e" in lines[2]


def test_a_replay_mark_older_than_sqs_keeps_messages_is_still_said_to_be_replayable(aws: None) -> None:
    # GIVEN a replay whose send failed and whose mark could not be put back, 15 days ago: nothing was queued, and its
    # request is still on the item (review "s31")
    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "t")
    item = {
        **rejected_item("ev-s"),
        "status": {"S": "queued"},
        "replayedAt": {"S": iso_millis(time.time() - 15 * 86400)},
    }
    ddb.put_item(TableName="t", Item=item)
    doc = relayctl_main._get(ddb, "t", "ev-s") or {}

    # WHEN / THEN show does not tell the operator that only the sender can send it again: replaying it sends it
    assert relayctl_main._replay_plan(doc) is None
    assert "replay it again" in str(relayctl_main._explain(doc, time.time()))


def test_a_dead_letter_found_stays_found_when_showing_the_messages_again_fails(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a dead letter, and a role that may receive from the queue but not change visibility (review "s31")
    from botocore.exceptions import ClientError

    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    sqs.send_message(QueueUrl=dlq, MessageBody='{"event": {"xdm": {"_id": "order-10"}}}')

    def denied(*_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ChangeMessageVisibilityBatch")

    monkeypatch.setattr(relayctl_main, "_show_again", denied)

    # WHEN / THEN the search still says where it is (the messages show again on their own after 30 s)
    where, unsearched = relayctl_main._search_dlq(sqs, dlq, "order-10")
    assert unsearched is None and where is not None and where["receiveCount"] == "1"
