"""relayctl against the local stack (issue 4, item 3): `relayctl.__main__.main([...])` in-process with the stack's
environment (HANDLES_TABLE, QUEUE_URL, DLQ_URL), events relayed by the real handler through the SQS poller."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from relay.integrations.store import decode_item
from relay.models import iso_millis
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import ERROR_TYPE_BASE, new_ecid
from devtools.poller import QueuePoller
from devtools.stack import DATASTREAM_ID, LocalStack
from relayctl.__main__ import main

pytestmark = pytest.mark.integration


@pytest.fixture
def ctl_env(clean_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> LocalStack:
    """The stack, with relayctl's variables set the way an operator would."""
    monkeypatch.setenv("QUEUE_URL", clean_stack.resources.queue_url)
    monkeypatch.setenv("DLQ_URL", clean_stack.resources.dlq_url)
    assert os.environ["HANDLES_TABLE"] == clean_stack.resources.table_name
    return clean_stack


def interact_event(event_id: str | None = None) -> dict[str, Any]:
    xdm: dict[str, Any] = {"identityMap": {"ECID": [{"id": new_ecid(), "primary": True}]}}
    if event_id is not None:
        xdm["_id"] = event_id
    return {"event": {"xdm": xdm}}


def poller(stack: LocalStack) -> QueuePoller:
    return stack.poller(Runtime(load_settings(os.environ)).handle, batching_window=0)


def send(stack: LocalStack, doc: dict[str, Any]) -> str:
    return send_raw(stack, json.dumps(doc))


def send_raw(stack: LocalStack, body: str) -> str:
    return stack.sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)["MessageId"]


def edge_requests(stack: LocalStack, event_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact") and r["xdm_id"] == event_id]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def metric_values(stdout: str, name: str) -> list[float]:
    """The values of metric `name` in the function's EMF lines (CloudWatch reads a log line as metrics when it is one
    JSON object with an `_aws` key; a value is a number or a list of them)."""
    values: list[float] = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            value = json.loads(line).get(name, [])
            values += value if isinstance(value, list) else [value]
    return values


def show(capsys: pytest.CaptureFixture[str], event_id: str) -> dict[str, Any]:
    code, out = run(capsys, "show", event_id)
    assert code == 0, out
    return json.loads(out)


def dead_letter(stack: LocalStack, doc: dict[str, Any], match_id: str | None = None) -> str:
    """Send `doc`, let Edge answer 503 until SQS moves it to the dead-letter queue; return its messageId."""
    message_id = send(stack, doc)
    rule = stack.sim.add_fault(match_id=match_id or message_id, status=503, retry_after=0)
    consumer = poller(stack)
    # the sixth receive moves it to the dead-letter queue; drain() returns once the queue is empty
    consumer.drain(timeout=40, raise_on_timeout=True)
    stack.sim.remove_fault(rule)
    counts = stack.sqs.get_queue_attributes(
        QueueUrl=stack.resources.dlq_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert sum(int(v) for v in counts.values()) == 1, (
        counts,
        stack.result(match_id or message_id),
        consumer.history[-3:],
    )
    return message_id


# ---------------------------------------------------------------------------------------------------------- replay


def test_rejected_event_is_listed_shown_replayed_and_then_delivered(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN an event Edge rejected with 422, relayed from the queue
    event_id = f"evt-{uuid.uuid4()}"
    doc = interact_event(event_id)
    stack.sim.add_fault(match_id=event_id, status=422)
    send(stack, doc)
    poller(stack).drain(timeout=20, raise_on_timeout=True)
    stored = stack.result(event_id)
    assert stored["status"] == "rejected"

    # WHEN the operator lists rejected events
    code, out = run(capsys, "rejected")

    # THEN it is there with its reason
    assert code == 0
    reason = "EXEG-0104-422: Unprocessable entity"
    assert out.splitlines() == [
        f"{'storedAt':<25} {'eventId':<40} {'source':<8} reason",
        f"{stored['storedAt']:<25} {event_id:<40} {'sqs':<8} {reason}",
        "1 rejected event(s)",
    ]
    code, out = run(capsys, "rejected", "--json")
    without_request = {k: v for k, v in stored.items() if k not in ("request", "pk", "sk")}
    assert (code, [{k: v for k, v in r.items() if k not in ("pk", "sk")} for r in json.loads(out)]) == (
        0,
        [without_request],
    )

    # WHEN the operator shows it
    shown = show(capsys, event_id)

    # THEN the reason is Edge's problem, and where other events sent under its eventId would be is said
    assert shown.pop("otherFilings").startswith(f"relayctl rejected --event-id {event_id} ")
    assert {k: v for k, v in shown.items() if k not in ("pk", "sk")} == without_request
    assert shown["error"]["type"] == ERROR_TYPE_BASE + "EXEG-0104-422"
    assert shown["error"]["title"] == "Unprocessable entity"
    code, out = run(capsys, "show", "--full", event_id)
    request = json.loads(out)["request"]  # as sent to Edge: xdm.timestamp filled in from SentTimestamp
    assert request == edge_requests(stack, event_id)[0]["body"]
    assert {**request["event"]["xdm"], "timestamp": None} == {**doc["event"]["xdm"], "timestamp": None}

    # WHEN Edge is fixed and the operator replays it
    stack.sim.clear_faults()
    rejected_at = stack.result(event_id)["storedAt"]
    before = iso_millis(time.time())
    code, out = run(capsys, "replay", event_id)

    # THEN it is back on the queue with its eventId, marked queued at the time of the replay
    assert (code, out) == (0, f"{event_id}: queued\n")
    replayed = stack.result(event_id)
    assert replayed["status"] == "queued"
    assert before <= replayed["replayedAt"] <= iso_millis(time.time())
    assert replayed["replayedAt"] > rejected_at
    assert show(capsys, event_id)["status"] == "queued"

    # WHEN the poller runs
    poller(stack).drain(timeout=20, raise_on_timeout=True)

    # THEN show says delivered, same eventId, with Edge's new requestId; Edge saw the same xdm._id twice
    shown = show(capsys, event_id)
    calls = edge_requests(stack, event_id)
    assert [c["status"] for c in calls] == [422, 200]
    assert calls[0]["body"]["event"] == calls[1]["body"]["event"]
    assert (shown["status"], shown["eventId"], shown["requestId"], shown["source"]) == (
        "delivered",
        event_id,
        calls[1]["request_id"],
        "sqs",
    )
    assert [h["type"] for h in shown["handle"]] == ["locationHint:result", "state:store"]
    # AND a second replay is refused: it is not rejected any more
    assert run(capsys, "replay", event_id) == (1, f"{event_id}: skipped: status is delivered\n")
    code, out = run(capsys, "rejected")
    assert out.splitlines()[-1] == "0 rejected event(s)"


def test_events_rejected_in_a_mistyped_datastream_are_replayed_to_the_right_one(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN a deployment whose DATASTREAM_ID had a typo: Edge rejected its events (400 EXEG-0003, final), and another
    # event rejected in the right datastream for a reason of its own
    typo = {**os.environ, "DATASTREAM_ID": "ds-locl"}
    mistyped = [f"evt-{uuid.uuid4()}" for _ in range(2)]
    for event_id in mistyped:
        send(stack, interact_event(event_id))
    stack.poller(Runtime(load_settings(typo)).handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)
    invalid = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=invalid, status=422)
    send(stack, interact_event(invalid))
    poller(stack).drain(timeout=20, raise_on_timeout=True)
    assert [stack.result(e)["error"]["type"] for e in mistyped] == [ERROR_TYPE_BASE + "EXEG-0003-400"] * 2
    assert {stack.result(e)["datastreamId"] for e in mistyped} == {"ds-locl"}

    # WHEN, DATASTREAM_ID fixed, the operator replays what was rejected in the mistyped one to the right one
    code, out = run(
        capsys, "replay", "--all-rejected", "--from-datastream", "ds-locl", "--to-datastream", DATASTREAM_ID
    )

    # THEN those two (and only they) are queued, and the relay delivers them to the right datastream
    assert (code, sorted(out.splitlines())) == (0, sorted(f"{e}: queued" for e in mistyped))
    poller(stack).drain(timeout=20, raise_on_timeout=True)
    for event_id in mistyped:
        assert (stack.result(event_id)["status"], stack.result(event_id)["datastreamId"]) == (
            "delivered",
            DATASTREAM_ID,
        )
        assert [c["query"]["datastreamId"] for c in edge_requests(stack, event_id)] == ["ds-locl", DATASTREAM_ID]
    assert stack.result(invalid)["status"] == "rejected"
    # AND a name the relay would refuse is refused here, before anything is marked
    with pytest.raises(SystemExit):
        main(["replay", "--all-rejected", "--to-datastream", "not a datastream"])
    with pytest.raises(SystemExit, match="--from-datastream picks among --all-rejected: pass that too"):
        main(["replay", invalid, "--from-datastream", "ds-locl"])


def test_events_refused_for_a_mistyped_allow_list_are_replayed_once_it_is_fixed(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN a deployment whose ALLOWED_DATASTREAM_IDS had a typo, leaving out the default datastream: the relay refused
    # every event that named none (400, stored rejected by the relay itself, final)
    typo = {**os.environ, "ALLOWED_DATASTREAM_IDS": "ds-locl"}
    # (one event's own id holds a "#", as a sender's "ORDER#1001" may: it is not one of the relay's filings)
    event_id, elsewhere, hashed = f"evt-{uuid.uuid4()}", f"evt-{uuid.uuid4()}", f"ORDER#{uuid.uuid4()}"
    sent_at = time.time()
    send(stack, interact_event(event_id))
    send(stack, interact_event(hashed))
    # (and one that named a datastream the list leaves out, perhaps on purpose: its own fault, not the list's)
    stack.sqs.send_message(
        QueueUrl=stack.resources.queue_url,
        MessageBody=json.dumps(interact_event(elsewhere)),
        MessageAttributes={"datastreamId": {"DataType": "String", "StringValue": "ds-elsewhere"}},
    )
    capsys.readouterr()
    stack.poller(Runtime(load_settings(typo)).handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)
    refused = stack.result(event_id)
    assert (refused["status"], refused["rejectedBy"]) == ("rejected", "relay")
    assert [e["path"] for e in refused["error"]["errors"]] == ["datastreamId"]
    # (what pages the operator: each refusal is a 1 in the metric RelayRefusedRateAlarm averages)
    assert metric_values(capsys.readouterr().out, "RefusedByRelay") == [1.0, 1.0, 1.0]

    # WHEN the operator replays the relay's refusals as they are, THEN they are skipped: the same message would be
    # refused again
    code, out = run(capsys, "replay", event_id)
    assert code == 1 and out.startswith(f"{event_id}: skipped: the relay refused it itself")

    # WHEN, the list fixed (a while later), the operator replays them to the datastream they should have gone to (they
    # are filed under the default datastream)
    time.sleep(2)
    code, out = run(
        capsys, "replay", "--all-rejected", "--from-datastream", DATASTREAM_ID, "--to-datastream", DATASTREAM_ID
    )

    # THEN they are queued, and the relay delivers them there; the one that named another datastream is left alone
    assert (code, sorted(out.splitlines())) == (0, sorted([f"{event_id}: queued", f"{hashed}: queued"]))
    assert stack.result(elsewhere)["status"] == "rejected"
    poller(stack).drain(timeout=20, raise_on_timeout=True)
    for eid in (event_id, hashed):
        delivered = stack.result(eid)
        assert (delivered["status"], delivered["datastreamId"]) == ("delivered", DATASTREAM_ID)
        [call] = edge_requests(stack, eid)
        assert call["query"]["datastreamId"] == DATASTREAM_ID
        # with the time the relay first received it, as any retry of an event that gave none (contract §2), not the
        # replay's
        xdm_time = datetime.fromisoformat(call["body"]["event"]["xdm"]["timestamp"]).timestamp()
        assert sent_at - 1 <= xdm_time <= sent_at + 1, (xdm_time, sent_at)
    shares = metric_values(capsys.readouterr().out, "RefusedByRelay")
    assert shares and set(shares) == {0.0}  # delivered: the share falls


def test_show_unknown_event_says_unknown(ctl_env: LocalStack, capsys) -> None:
    # GIVEN nothing about this event  WHEN shown  THEN unknown, exit 1
    code, out = run(capsys, "show", "evt-never-seen")
    assert code == 1
    shown = json.loads(out)
    assert shown["status"] == "unknown"
    # it says how far it looked in the dead-letter queue, not that the event is nowhere in it
    assert "not among the first 1,000 messages of the dead-letter queue" in shown["detail"]


# ---------------------------------------------------------------------------------------------------------- redrive


def test_redrive_moves_a_dead_letter_message_back_and_it_is_delivered(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN an event (with its own xdm._id) that Edge refused with 503 until it reached the dead-letter queue
    event_id = f"evt-{uuid.uuid4()}"
    dead_letter(stack, interact_event(event_id), match_id=event_id)
    # (5 attempts on its first receive; Edge then looked down, and each later receive made one)
    assert len(edge_requests(stack, event_id)) == 5 + 4

    # WHEN the operator redrives the dead-letter queue
    code, out = run(capsys, "redrive")

    # THEN the message is back on the queue and the dead-letter queue is empty
    assert (code, out) == (0, "moved 1 message(s) from the dead-letter queue to the queue\n")
    attrs = stack.sqs.get_queue_attributes(QueueUrl=stack.resources.dlq_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0"

    # WHEN the poller runs (Edge has recovered)
    poller(stack).drain(timeout=20, raise_on_timeout=True)

    # THEN it is delivered under the same eventId
    shown = show(capsys, event_id)
    assert (shown["status"], shown["eventId"]) == ("delivered", event_id)
    assert [c["status"] for c in edge_requests(stack, event_id)] == [503] * (5 + 4) + [200]


def test_redrive_keeps_the_event_id_of_an_event_without_xdm_id(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN an event without xdm._id (its eventId is its messageId) that reached the dead-letter queue
    message_id = dead_letter(stack, interact_event())
    assert {c["xdm_id"] for c in edge_requests(stack, message_id)} == {message_id}

    # WHEN the operator redrives it and the poller delivers it
    assert run(capsys, "redrive")[0] == 0
    poller(stack).drain(timeout=20, raise_on_timeout=True)

    # THEN it is delivered as the same event: same eventId, same xdm._id at Edge
    shown = show(capsys, message_id)
    assert (shown["status"], shown["eventId"]) == ("delivered", message_id)
    assert [c["status"] for c in edge_requests(stack, message_id)] == [503] * (5 + 4) + [200]


def test_show_says_dead_lettered_for_an_event_in_the_dead_letter_queue(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN an event that reached the dead-letter queue after 5 receives
    event_id = f"evt-{uuid.uuid4()}"
    message_id = dead_letter(stack, interact_event(event_id), match_id=event_id)

    # WHEN the operator shows it
    shown = show(capsys, event_id)

    # THEN it says where the event is
    assert (shown["status"], shown.get("messageId")) == ("dead-lettered", message_id)


def test_forget_erases_one_persons_state_results_and_refused_bodies_and_nothing_else(
    ctl_env: LocalStack, capsys
) -> None:
    stack = ctl_env
    table = stack.resources.table_name
    # GIVEN alice and bob with two delivered events each (so a state item each), one more of alice's events that
    # Edge rejected, and a body refused before any identity was read (not JSON) that names alice
    tag = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{tag}@example.com", f"bob-{tag}@example.com"

    def of(person: str, event_id: str) -> dict[str, Any]:
        return {"event": {"xdm": {"_id": event_id, "identityMap": {"Email": [{"id": person, "primary": True}]}}}}

    events = {f"{who}-{tag}-{n}": person for who, person in (("a", alice), ("b", bob)) for n in (1, 2)}
    events[f"a-{tag}-3"] = alice
    stack.sim.add_fault(match_id=f"a-{tag}-3", status=422)
    for event_id, person in events.items():
        send(stack, of(person, event_id))
    cut_off = json.dumps(of(alice, f"a-{tag}-4"))[:-3]
    refused = send_raw(stack, cut_off)
    poller(stack).drain(timeout=30, raise_on_timeout=True)
    assert [stack.result(e)["status"] for e in events] == ["delivered"] * 4 + ["rejected"]
    assert stack.result(refused)["status"] == "rejected"
    before = stack.dynamodb.scan(TableName=table)["Items"]

    # WHEN the operator forgets alice, after a dry run
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice, "--dry-run")
    assert code == 0, out
    assert (
        "would delete 1 state item(s), 3 result(s), 1 refused body(ies); 0 of this identity's event(s) waiting" in out
    )
    assert len(stack.dynamodb.scan(TableName=table)["Items"]) == len(before)
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice)

    # THEN her state, results and refused body are gone and nothing left names her; bob's are untouched
    assert code == 0, out
    after = stack.dynamodb.scan(TableName=table)["Items"]
    assert len(before) - len(after) == 5
    assert alice not in json.dumps([decode_item(i) for i in after], ensure_ascii=False)
    assert all(stack.result_item(e) is None for e in events if e.startswith("a-"))
    assert stack.result_item(refused) is None
    assert [stack.result(e)["status"] for e in events if e.startswith("b-")] == ["delivered"] * 2
    assert sum(1 for i in after if i["pk"]["S"].startswith("IDENTITY#")) == 1  # bob's


def test_forget_without_the_identity_key_refuses_rather_than_find_nothing(
    ctl_env: LocalStack, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN no identity key given (its ids would not match the relay's keyed ones)
    monkeypatch.delenv("IDENTITY_KEY_SECRET_ID", raising=False)

    # WHEN / THEN forget says what it needs instead of reporting nothing found
    with pytest.raises(SystemExit, match="no identity key"):
        main(["forget", "--namespace", "Email", "--id", "alice@example.com"])


def test_forget_finds_a_secondary_identity_and_never_another_persons_body(ctl_env: LocalStack, capsys) -> None:
    stack = ctl_env
    # GIVEN an event Edge rejected whose primary identity is an ECID and which carries alice as a secondary identity,
    # and bob's refused event (not JSON) with a purchase id "42" in it
    tag = uuid.uuid4().hex[:8]
    alice = f"alice-{tag}@example.com"
    secondary = f"np-{tag}"
    doc = interact_event(secondary)
    doc["event"]["xdm"]["identityMap"]["Email"] = [{"id": alice}]
    stack.sim.add_fault(match_id=secondary, status=422)
    send(stack, doc)
    bobs = json.dumps({"event": {"xdm": {"_id": f"bob-{tag}", "commerce": {"order": {"purchaseID": "42"}}}}})[:-2]
    bob_message = send_raw(stack, bobs)
    # AND alice's own refused event, whose identity map gives her as a bare string (not an array of identities)
    flat = f"flat-{tag}"
    send(stack, {"event": {"xdm": {"_id": flat, "identityMap": {"Email": alice}}}})
    # AND two of her events refused as sent: in an SNS notification (a subscription without raw delivery), and
    # JSON-encoded twice
    hers = {"event": {"xdm": {"identityMap": {"Email": [{"id": alice, "primary": True}]}}}}
    wrapped = send_raw(stack, json.dumps({"Type": "Notification", "MessageId": tag, "Message": json.dumps(hers)}))
    twice = send_raw(stack, json.dumps(json.dumps(hers)))
    poller(stack).drain(timeout=30, raise_on_timeout=True)
    assert stack.result(secondary)["status"] == "rejected"
    assert stack.result(bob_message)["status"] == "rejected"
    assert stack.result(flat)["status"] == "rejected"
    assert [stack.result(m)["status"] for m in (wrapped, twice)] == ["rejected", "rejected"]

    # WHEN the operator forgets alice, and then a CRMID "42" nobody has
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice)
    assert code == 0, out
    code_42, out_42 = run(capsys, "forget", "--namespace", "CRMID", "--id", "42")

    # THEN the requests that carried alice are gone; bob's body, where "42" is no CRMID, is kept, and the operator is
    # told nothing was found (exit 1)
    assert stack.result_item(secondary) is None
    assert stack.result_item(flat) is None
    assert stack.result_item(wrapped) is None and stack.result_item(twice) is None
    assert stack.result_item(bob_message) is not None
    assert code_42 == 1 and "nothing found for that value under CRMID" in out_42
    assert "42" not in out_42  # the value is not printed back (an erasure's output may end up in a log)


def test_forget_names_a_refused_body_it_cannot_read_and_exits_1_rather_than_skip_it(
    ctl_env: LocalStack, capsys
) -> None:
    stack = ctl_env
    # GIVEN a refused body stored in an encoding this relayctl does not read (another version's, or edited by hand)
    tag = uuid.uuid4().hex[:8]
    alice = f"alice-{tag}@example.com"
    stack.dynamodb.put_item(
        TableName=stack.resources.table_name,
        Item={
            "pk": {"S": f"EVENT#odd-{tag}"},
            "sk": {"S": "RESULT"},
            "status": {"S": "rejected"},
            "identityId": {"S": ""},
            "request": {"M": {"Email": {"S": alice}}},
        },
    )

    # WHEN the operator forgets alice
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice)

    # THEN the item is named as one to check by hand, and the exit code says the erasure is not known to be complete
    assert code == 1, out
    assert f"left EVENT#odd-{tag} RESULT: its stored request cannot be read" in out
    assert stack.result_item(f"odd-{tag}") is not None


def test_forget_exits_1_only_while_events_of_this_identity_or_of_unknown_owner_wait(
    ctl_env: LocalStack, capsys
) -> None:
    stack = ctl_env
    # GIVEN alice delivered once, and bob's event waiting in the queue (Edge unavailable)
    tag = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{tag}@example.com", f"bob-{tag}@example.com"

    def of(person: str, event_id: str) -> dict[str, Any]:
        return {"event": {"xdm": {"_id": event_id, "identityMap": {"Email": [{"id": person, "primary": True}]}}}}

    send(stack, of(alice, f"w1-{tag}"))
    poller(stack).drain(timeout=30, raise_on_timeout=True)
    for event_id in (f"b1-{tag}", f"w2-{tag}"):
        stack.sim.add_fault(match_id=event_id, status=503, retry_after=0)
    send(stack, of(bob, f"b1-{tag}"))
    poller(stack).poll_once(wait_time_seconds=0)
    assert stack.result(f"b1-{tag}")["status"] == "queued"

    # WHEN the operator forgets alice
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice)

    # THEN hers is deleted, and bob's waiting event does not hold the erasure open: its claim says whose it is
    assert code == 0, out
    assert stack.result_item(f"w1-{tag}") is None
    assert "0 of this identity's event(s) waiting, 0 whose cannot be told, 1 of other identities" in out

    # AND WHEN one of alice's events waits too (claimed with carol's in one batch: the batch's INSERT claims), beside
    # an event a relay of an older version claimed (no claimedBy)
    # (each with its own xdm.timestamp, so that only claimedBy says whose it is)
    carol = f"carol-{tag}@example.com"
    stack.sim.add_fault(match_id=f"c1-{tag}", status=503, retry_after=0)
    for person, event_id in ((alice, f"w2-{tag}"), (carol, f"c1-{tag}")):
        doc = of(person, event_id)
        doc["event"]["xdm"]["timestamp"] = "2026-11-29T00:00:00.000Z"
        send(stack, doc)
    assert poller(stack).poll_once(wait_time_seconds=1) == 2
    assert [stack.result(e)["status"] for e in (f"w2-{tag}", f"c1-{tag}")] == ["queued", "queued"]
    stack.dynamodb.put_item(
        TableName=stack.resources.table_name,
        Item={"pk": {"S": f"EVENT#old-{tag}"}, "sk": {"S": "RESULT"}, "status": {"S": "queued"}},
    )
    code, out = run(capsys, "forget", "--namespace", "Email", "--id", alice)

    # THEN both keep forget exiting 1 (run it again once they are finished), and hers is named
    assert code == 1, out
    assert "1 of this identity's event(s) waiting, 1 whose cannot be told, 2 of other identities" in out
    assert f"waiting EVENT#w2-{tag} RESULT: this identity's" in out
    assert "1 event(s) of this identity are still queued or in flight" in out
    assert "1 event(s) still queued or in flight were taken by an older version" in out
