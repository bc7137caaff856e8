"""Tests of the Edge Network + IMS simulator (devtools/edge_sim.py) over loopback HTTP."""

from __future__ import annotations

import base64
import email.utils
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from devtools.edge_sim import (
    FIXTURE_DIR,
    EdgeSimulator,
    SimulatorClient,
    decode_identity_state,
    ecid_from_fpid,
    encode_identity_state,
)

ORG = "5BFE274A5F6980A50A495C08@AdobeOrg"
PREFIX = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg"
CLIENT_ID = "local-client-id"
CLIENT_SECRET = "local-client-secret"
ERR = "https://ns.adobe.com/aep/errors/"
REPO = Path(__file__).resolve().parents[2]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "edge-responses"


@pytest.fixture(scope="module")
def sim() -> Iterator[EdgeSimulator]:
    with EdgeSimulator(datastreams=("ds-local", "ds-other")) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _clean(sim: EdgeSimulator) -> None:
    sim.reset()


@pytest.fixture
def token(sim: EdgeSimulator) -> str:
    return sim.issue_token()


@pytest.fixture
def client(sim: EdgeSimulator) -> Iterator[SimulatorClient]:
    with SimulatorClient(sim.url) as c:
        yield c


def make_event(xdm_id: str = "evt-1", identity: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    identity_map = identity if identity is not None else {"CRMID": [{"id": "user-1", "primary": True}]}
    body: dict[str, Any] = {"event": {"xdm": {"_id": xdm_id, "identityMap": identity_map}}}
    body.update(top)
    return body


def edge_headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-api-key": CLIENT_ID, "x-gw-ims-org-id": ORG}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def interact(
    sim: EdgeSimulator,
    token: str | None,
    body: Any = None,
    *,
    hint: str | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 5.0,
    session: requests.Session | None = None,
) -> requests.Response:
    path = f"/ee/{hint}/v2/interact" if hint else "/ee/v2/interact"
    hdrs = edge_headers(token)
    hdrs.update(headers or {})
    payload = data if data is not None else json.dumps(body if body is not None else make_event()).encode()
    poster = session.post if session is not None else requests.post
    return poster(
        sim.url + path,
        params=params if params is not None else {"datastreamId": "ds-local"},
        headers=hdrs,
        data=payload,
        timeout=timeout,
    )


def handles(resp: requests.Response) -> dict[str, list[Any]]:
    return {h["type"]: h["payload"] for h in resp.json()["handle"]}


def state_entries(resp: requests.Response) -> dict[str, dict[str, Any]]:
    return {e["key"]: e for e in handles(resp)["state:store"]}


def ecid_of(resp: requests.Response) -> str:
    value = state_entries(resp)[f"{PREFIX}_identity"]["value"]
    ecid = decode_identity_state(value)
    assert ecid is not None
    return ecid


def returning(ecid: str, xdm_id: str = "evt-1") -> dict[str, Any]:
    entry = {"key": f"{PREFIX}_identity", "value": encode_identity_state(ecid)}
    return make_event(xdm_id, meta={"state": {"entries": [entry]}})


def assert_problem(resp: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    problem = resp.json()
    assert problem["type"] == ERR + code
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    assert re.search(r"-[0-9a-f]{16}$", problem["report"]["requestId"])
    return problem


# ---- IMS ------------------------------------------------------------------------------------------------------------


def ims_form(**overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "openid,AdobeID",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def test_ims_issues_token_usable_on_edge(sim: EdgeSimulator) -> None:
    resp = requests.post(sim.ims_url, data=ims_form(), timeout=5)
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["token_type"] == "bearer" and answer["expires_in"] == 86399 and answer["access_token"]
    assert interact(sim, answer["access_token"]).status_code == 200
    assert sim.stats()["ims_requests"] == 1
    logged = sim.requests_log()[0]
    assert logged["path"] == "/ims/token/v3" and logged["status"] == 200
    assert logged["body"]["client_secret"] == "***"


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"grant_type": None}, 400, "invalid_request"),
        ({"client_secret": None}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
    ],
)
def test_ims_errors(sim: EdgeSimulator, overrides: dict[str, str | None], status: int, error: str) -> None:
    resp = requests.post(sim.ims_url, data=ims_form(**overrides), timeout=5)
    assert resp.status_code == status
    assert resp.json()["error"] == error and resp.json()["error_description"]


def test_expired_token_then_fresh_token(sim: EdgeSimulator, client: SimulatorClient) -> None:
    old = requests.post(sim.ims_url, data=ims_form(), timeout=5).json()["access_token"]
    client.expire_tokens()
    assert_problem(interact(sim, old), 401, "EXEG-0503-401")
    new = requests.post(sim.ims_url, data=ims_form(), timeout=5).json()["access_token"]
    assert interact(sim, new).status_code == 200
    short = sim.issue_token(ttl=2.0)  # long enough to be used at once on a loaded machine
    assert interact(sim, short).status_code == 200
    time.sleep(2.1)
    assert_problem(interact(sim, short), 401, "EXEG-0503-401")


# ---- validation -----------------------------------------------------------------------------------------------------


def test_auth_errors(sim: EdgeSimulator, token: str) -> None:
    assert_problem(interact(sim, None), 401, "EXEG-0500-401")
    assert_problem(interact(sim, None, headers={"Authorization": "Basic abc"}), 401, "EXEG-0500-401")
    assert_problem(interact(sim, "not-a-token"), 401, "EXEG-0502-401")
    problem = assert_problem(interact(sim, token, headers={"x-api-key": "other"}), 401, "EXEG-0500-401")
    assert "x-api-key" in problem["detail"]
    problem = assert_problem(interact(sim, token, headers={"x-gw-ims-org-id": "X@AdobeOrg"}), 401, "EXEG-0500-401")
    assert "x-gw-ims-org-id" in problem["detail"]


def test_no_auth_mode_accepts_anonymous_calls() -> None:
    with EdgeSimulator(require_auth=False) as open_sim:
        resp = requests.post(
            open_sim.url + "/ee/v2/interact?datastreamId=ds-local",
            data=json.dumps(make_event()),
            headers={"Content-Type": "text/plain; charset=UTF-8"},
            timeout=5,
        )
        assert resp.status_code == 200


def test_datastream_errors(sim: EdgeSimulator, token: str) -> None:
    assert_problem(interact(sim, token, params={}), 400, "EXEG-0002-400")
    problem = assert_problem(interact(sim, token, params={"datastreamId": "BOGUS"}), 400, "EXEG-0003-400")
    fixture = json.loads((FIXTURE_DIR / "error-invalid-datastream.json").read_text())
    assert problem["title"] == fixture["title"] and problem["detail"] == fixture["detail"]
    assert interact(sim, token, params={"dataStreamId": "ds-other"}).status_code == 200


def test_content_type_and_body_errors(sim: EdgeSimulator, token: str) -> None:
    assert_problem(interact(sim, token, headers={"Content-Type": "application/xml"}), 415, "EXEG-0111-415")
    assert interact(sim, token, headers={"Content-Type": "text/plain;charset=UTF-8"}).status_code == 200
    assert_problem(interact(sim, token, data=b""), 408, "EXEG-0109-408")
    big = make_event()
    big["event"]["data"] = {"blob": "x" * 70000}
    assert_problem(interact(sim, token, big), 413, "EXEG-0112-413")
    assert_problem(interact(sim, token, data=b"{not json"), 400, "EXEG-0101-400")
    for constant in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json reads these; JSON has no such values
        nan = b'{"event": {"xdm": {"_id": "n", "identityMap": {"CRMID": [{"id": "u", "primary": true}]}, "v": %s}}}'
        assert_problem(interact(sim, token, data=nan % constant), 400, "EXEG-0101-400")
    problem = assert_problem(interact(sim, token, {"event": {"data": {}}}), 400, "EXEG-0102-400")
    assert problem["title"] == "Invalid request" and "event.xdm" in problem["detail"]
    assert_problem(interact(sim, token, [1, 2]), 400, "EXEG-0102-400")
    problem = assert_problem(interact(sim, token, {"query": {}}), 400, "EXEG-0102-400")
    assert "'event'" in problem["detail"]


def test_auth_is_checked_before_datastream_and_body(sim: EdgeSimulator) -> None:
    assert_problem(interact(sim, None, params={"datastreamId": "BOGUS"}, data=b"nope"), 401, "EXEG-0500-401")


def test_no_primary_identity(sim: EdgeSimulator, token: str) -> None:
    body = make_event(identity={"CRMID": [{"id": "u", "primary": False}]})
    problem = assert_problem(interact(sim, token, body), 400, "EXEG-0306-400")
    assert problem["title"] == "No primary identity set in request (event)"
    assert problem["report"]["configId"] == "ds-local" and problem["report"]["orgId"] == ORG
    no_map = {"event": {"xdm": {"_id": "x"}}}
    assert_problem(interact(sim, token, no_map), 400, "EXEG-0306-400")
    # an identity is required to have an id (reference §1.2): an empty one names nobody
    empty = make_event(identity={"CRMID": [{"id": "", "primary": True}]})
    assert_problem(interact(sim, token, empty), 400, "EXEG-0306-400")


# ---- success --------------------------------------------------------------------------------------------------------


def test_success_shape(sim: EdgeSimulator, token: str) -> None:
    body = make_event(query={"identity": {"fetch": ["ECID"]}})
    resp = interact(sim, token, body, params={"datastreamId": "ds-local", "requestId": "my-req-1"})
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    answer = resp.json()
    assert re.fullmatch(r"my-req-1-[0-9a-f]{16}", answer["requestId"])
    assert [h["type"] for h in answer["handle"]] == ["identity:result", "locationHint:result", "state:store"]
    hs = handles(resp)
    ecid = hs["identity:result"][0]["id"]
    assert re.fullmatch(r"[1-9][0-9]{37}", ecid) and hs["identity:result"][0]["namespace"] == {"code": "ECID"}
    assert hs["locationHint:result"] == [
        {"scope": "Target", "hint": "35", "ttlSeconds": 1800},
        {"scope": "AAM", "hint": "9", "ttlSeconds": 1800},
        {"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800},
    ]
    assert hs["state:store"] == [
        {"key": f"{PREFIX}_identity", "value": encode_identity_state(ecid), "maxAge": 34128000},
        {"key": f"{PREFIX}_cluster", "value": "or2", "maxAge": 1800},
    ]
    assert resp.headers["x-adobe-edge"] == "or2;35"
    assert "errors" not in answer and "warnings" not in answer
    # request id from the header, none at all, and no identity:result without the fetch query
    resp = interact(sim, token, headers={"x-request-id": "hdr-id"})
    assert resp.json()["requestId"].startswith("hdr-id-")
    assert "identity:result" not in handles(resp)
    generated = interact(sim, token).json()["requestId"]
    assert re.fullmatch(r"[0-9a-f-]{36}-[0-9a-f]{16}", generated)
    entry = sim.requests_log()[0]
    assert entry["xdm_id"] == "evt-1" and entry["ecid"] == ecid and entry["hint"] is None
    assert entry["query"]["requestId"] == "my-req-1" and entry["headers"]["x-api-key"] == CLIENT_ID
    assert entry["body"] == body and entry["status"] == 200 and entry["size"] > 0


def test_personalization_decisions(sim: EdgeSimulator, token: str) -> None:
    resp = interact(sim, token, make_event(query={"personalization": {"schemas": []}}))
    answer = resp.json()
    assert answer["handle"][-1]["type"] == "personalization:decisions"
    assert answer["handle"][-1]["eventIndex"] == 0
    view = json.loads((FIXTURE_DIR / "personalization-view.json").read_text())
    expected = next(h["payload"] for h in view["handle"] if h["type"] == "personalization:decisions")
    assert answer["handle"][-1]["payload"] == expected


def test_returning_visitor_keeps_ecid_new_visitor_gets_new(sim: EdgeSimulator, token: str) -> None:
    first = interact(sim, token)
    ecid = ecid_of(first)
    entries = [{"key": k, "value": e["value"]} for k, e in state_entries(first).items()]
    back = make_event(meta={"state": {"entries": entries}})
    assert ecid_of(interact(sim, token, back)) == ecid
    # URL-safe base64 without padding is understood too
    urlsafe = encode_identity_state(ecid).replace("+", "-").replace("/", "_").rstrip("=")
    again = make_event(meta={"state": {"entries": [{"key": f"{PREFIX}_identity", "value": urlsafe, "maxAge": 10}]}})
    assert ecid_of(interact(sim, token, again)) == ecid
    # without state (or with garbage) the same CRMID is a new visitor
    assert ecid_of(interact(sim, token)) != ecid
    garbage = make_event(meta={"state": {"entries": [{"key": f"{PREFIX}_identity", "value": "%%%"}]}})
    assert ecid_of(interact(sim, token, garbage)) != ecid


def test_an_identity_entry_issued_elsewhere_continues_its_own_ecid(sim: EdgeSimulator, token: str) -> None:
    # GIVEN the identity entry of Adobe's real captured answer (an ECID this simulator never issued)
    fixture = json.loads((FIXTURE_DIR / "send-event-with-identity.json").read_text())
    payloads = {h["type"]: h["payload"] for h in fixture["handle"]}
    [entry] = [e for e in payloads["state:store"] if e["key"].endswith("_identity")]
    [identity] = payloads["identity:result"]
    assert entry["key"] == f"{PREFIX}_identity"

    # WHEN it is sent back, as an SDK (or the relay) does
    back = make_event(meta={"state": {"entries": [{"key": entry["key"], "value": entry["value"]}]}})

    # THEN Edge continues that visitor: the ECID inside the value, not a new one
    assert ecid_of(interact(sim, token, back)) == identity["id"] == decode_identity_state(entry["value"])


def test_fpid_is_deterministic_and_ecid_wins(sim: EdgeSimulator, token: str) -> None:
    fpid = {"FPID": [{"id": "fpid-abc", "primary": True}]}
    a = ecid_of(interact(sim, token, make_event(identity=fpid)))
    b = ecid_of(interact(sim, token, make_event(identity=fpid)))
    assert a == b == ecid_from_fpid("fpid-abc")
    assert len(a) == 38
    with_ecid = {**fpid, "ECID": [{"id": "12345678901234567890123456789012345678"}]}
    assert ecid_of(interact(sim, token, make_event(identity=with_ecid))) == "12345678901234567890123456789012345678"


def test_identity_state_codec() -> None:
    fixture_value = "CiQ0MTg2MTY2NjE5MzE0MDE2MTkzNDI3Njg0NTY1MTE0ODg3Njk4OA=="
    assert decode_identity_state(fixture_value) == "41861666193140161934276845651148876988"
    ecid = "41861666193140161934276845651148876988"
    assert base64.b64decode(encode_identity_state(ecid)) == b"\n&" + ecid.encode()
    assert decode_identity_state(encode_identity_state("short-id")) == "short-id"
    long_id = "x" * 300
    assert decode_identity_state(encode_identity_state(long_id)) == long_id
    for junk in ("", "!!!", "AAAA", None, 42, base64.b64encode(b"\n\x50abc").decode()):
        assert decode_identity_state(junk) is None


def test_hinted_path_and_move_visitor(sim: EdgeSimulator, client: SimulatorClient, token: str) -> None:
    first = interact(sim, token)
    ecid = ecid_of(first)
    back = returning(ecid)
    assert interact(sim, token, back, hint="or2").status_code == 200
    resp = interact(sim, token, back, hint="va6")  # wrong region: Edge still answers
    assert resp.status_code == 200
    log = sim.requests_log()
    assert [e["hint"] for e in log] == [None, "or2", "va6"]
    assert [e["hint_mismatch"] for e in log] == [False, False, True]
    assert sim.stats()["hint_mismatches"] == 1

    client.move_visitor(ecid, "irl1", ttl_seconds=900)
    resp = interact(sim, token, back, hint="or2")
    edge_hint = [p for p in handles(resp)["locationHint:result"] if p["scope"] == "EdgeNetwork"]
    assert edge_hint == [{"scope": "EdgeNetwork", "hint": "irl1", "ttlSeconds": 900}]
    assert state_entries(resp)[f"{PREFIX}_cluster"] == {"key": f"{PREFIX}_cluster", "value": "irl1", "maxAge": 900}
    assert resp.headers["x-adobe-edge"] == "irl1;6"
    assert client.visitors()[ecid]["hint"] == "irl1"
    with pytest.raises(ValueError):
        sim.move_visitor(ecid, "Bad Hint")


def test_queued_state_entries(sim: EdgeSimulator, client: SimulatorClient, token: str) -> None:
    ecid = ecid_of(interact(sim, token))
    back = returning(ecid)
    extra = [{"key": f"{PREFIX}_consent", "value": "", "maxAge": 0}, {"key": "custom", "value": "v", "maxAge": 60}]
    client.queue_state_entries(ecid, extra)
    for _ in range(2):  # persists until cleared
        entries = handles(interact(sim, token, back))["state:store"]
        assert entries[2:] == extra
    client.clear_state_entries(ecid)
    assert len(handles(interact(sim, token, back))["state:store"]) == 2


def test_a_queued_entry_under_a_key_edge_sets_itself_replaces_it(
    sim: EdgeSimulator, client: SimulatorClient, token: str
) -> None:
    # GIVEN a visitor whose cluster entry the next answers delete (as Edge would, to move or forget the visitor)
    ecid = ecid_of(interact(sim, token))
    deletion = {"key": f"{PREFIX}_cluster", "value": "", "maxAge": 0}
    client.queue_state_entries(ecid, [deletion])

    # WHEN it comes back, THEN the answer carries that key once, the deletion (a review found it twice: the simulator's
    # own entry, then the queued one; Edge gives a key once)
    keys = [e["key"] for e in handles(interact(sim, token, returning(ecid)))["state:store"]]
    assert keys == [f"{PREFIX}_identity", f"{PREFIX}_cluster"]
    assert state_entries(interact(sim, token, returning(ecid)))[f"{PREFIX}_cluster"] == deletion


def test_collect_and_unknown_routes(sim: EdgeSimulator, token: str) -> None:
    body = {"events": [make_event()["event"], make_event("evt-2")["event"]]}
    url = sim.url + "/ee/or2/v2/collect?datastreamId=ds-local"
    resp = requests.post(url, data=json.dumps(body), headers=edge_headers(token), timeout=5)
    assert resp.status_code == 202 and re.search(r"-[0-9a-f]{16}$", resp.json()["requestId"])
    silent = requests.post(url + "&silent=true", data=json.dumps(body), headers=edge_headers(token), timeout=5)
    assert silent.status_code == 204 and silent.content == b""
    missing = requests.post(sim.url + "/nope", timeout=5)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/problem+json"
    assert requests.get(sim.url + "/ee/v2/interact", timeout=5).status_code == 405
    assert sim.stats()["collect_requests"] == 2


# ---- faults ---------------------------------------------------------------------------------------------------------


def test_429_retry_after_seconds_and_times(sim: EdgeSimulator, token: str) -> None:
    rule = sim.add_fault(status=429, retry_after=2, times=2)
    for _ in range(2):
        resp = interact(sim, token)
        assert_problem(resp, 429, "EXEG-0000-429")
        assert resp.headers["Retry-After"] == "2"
    assert interact(sim, token).status_code == 200
    assert sim.faults() == [] and not sim.remove_fault(rule)
    assert [e["fault"] for e in sim.requests_log()] == [rule, rule, None]


def test_503_retry_after_http_date(sim: EdgeSimulator, token: str) -> None:
    sim.add_fault(status=503, retry_after=30, retry_after_http_date=True, times=1)
    resp = interact(sim, token)
    assert_problem(resp, 503, "EXEG-0000-503")
    when = email.utils.parsedate_to_datetime(resp.headers["Retry-After"])
    assert 25 <= when.timestamp() - time.time() <= 31


@pytest.mark.parametrize(("status", "code"), [(500, "EXEG-0001-500"), (502, "EXEG-0202-502"), (504, "EXEG-0200-504")])
def test_status_faults(sim: EdgeSimulator, token: str, status: int, code: str) -> None:
    sim.add_fault(status=status, times=1)
    resp = interact(sim, token)
    assert_problem(resp, status, code)
    assert "Retry-After" not in resp.headers


def test_502_non_json_gateway_body(sim: EdgeSimulator, token: str) -> None:
    html = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    sim.add_fault(status=502, body=html, content_type="text/html", times=1)
    resp = interact(sim, token)
    assert resp.status_code == 502 and resp.text == html and resp.headers["Content-Type"] == "text/html"


def test_207_errors_and_warnings(sim: EdgeSimulator, client: SimulatorClient, token: str) -> None:
    client.add_fault(status=207, times=1)
    resp = interact(sim, token)
    assert resp.status_code == 207
    answer = resp.json()
    assert {h["type"] for h in answer["handle"]} >= {"locationHint:result", "state:store"}
    assert answer["errors"][0]["type"] == ERR + "EXEG-0201-503"
    assert answer["errors"][0]["report"] == {"eventIndex": 0}

    custom = [{"type": ERR + "EXEG-0200-504", "status": 504, "title": "t", "report": {"eventIndex": 0}}]
    client.add_fault(errors=custom, times=1)
    resp = interact(sim, token)
    assert resp.status_code == 207 and resp.json()["errors"] == custom

    client.add_fault(warnings=True, times=1)
    resp = interact(sim, token)
    assert resp.status_code == 200
    assert resp.json()["warnings"][0]["type"] == ERR + "EXEG-0204-200" and "errors" not in resp.json()


def test_slow_answer_times_out_client(sim: EdgeSimulator, token: str) -> None:
    sim.add_fault(delay=0.6, times=1)
    with pytest.raises(requests.ReadTimeout):
        interact(sim, token, timeout=0.2)
    assert sim.requests_log()[0]["status"] == 200  # the event landed even though the client gave up
    assert interact(sim, token, timeout=2).status_code == 200


def test_drop_resets_connection(sim: EdgeSimulator, client: SimulatorClient, token: str) -> None:
    client.add_fault(drop=True, times=1)
    with pytest.raises(requests.ConnectionError):
        interact(sim, token)
    assert interact(sim, token).status_code == 200
    stats = client.stats()
    assert stats["dropped"] == 1 and stats["by_status"] == {0: 1, 200: 1}


def test_fault_matchers_and_after_auth(sim: EdgeSimulator, token: str) -> None:
    sim.add_fault(status=504, match_id="evt-target")
    sim.add_fault(status=500, match_datastream="ds-other")
    assert interact(sim, token, make_event("evt-other")).status_code == 200
    assert interact(sim, token, make_event("evt-target")).status_code == 504
    assert interact(sim, token, make_event("evt-target")).status_code == 504  # times=None: forever
    assert interact(sim, token, params={"datastreamId": "ds-other"}).status_code == 500
    sim.clear_faults()
    sim.add_fault(status=503, before_auth=False)
    assert_problem(interact(sim, "bad-token"), 401, "EXEG-0502-401")
    assert interact(sim, token).status_code == 503


def test_ims_fault_by_path(sim: EdgeSimulator, token: str) -> None:
    sim.add_fault(status=503, match_path="/ims/token/v3", retry_after=1, times=1)
    assert interact(sim, token).status_code == 200  # path-scoped rule leaves Edge alone
    resp = requests.post(sim.ims_url, data=ims_form(), timeout=5)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert requests.post(sim.ims_url, data=ims_form(), timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "invalid_request"), (401, "invalid_client"), (403, "invalid_request"), (503, "server_error")],
)
def test_an_ims_fault_answers_in_ims_shape_not_edges(sim: EdgeSimulator, status: int, error: str) -> None:
    # IMS errors are OAuth 2.0's (RFC 6749 §5.2, reference §7), as the simulator's own refusals: not a problem document
    sim.add_fault(status=status, match_path="/ims/token/v3", times=1)
    resp = requests.post(sim.ims_url, data=ims_form(), timeout=5)
    assert (resp.status_code, resp.headers["Content-Type"]) == (status, "application/json")
    assert resp.json() == {"error": error, "error_description": "Injected fault."}


def test_fixture_answer_is_verbatim(sim: EdgeSimulator, token: str) -> None:
    sim.add_fault(fixture="send-event.json", times=1)
    resp = interact(sim, token)
    assert resp.status_code == 200
    assert resp.content == (FIXTURE_DIR / "send-event.json").read_bytes()
    if SHARED_FIXTURES.is_dir():
        for path in SHARED_FIXTURES.glob("*.json"):
            assert json.loads((FIXTURE_DIR / path.name).read_text()) == json.loads(path.read_text())
    with pytest.raises(ValueError):
        sim.add_fault(fixture="../edge_sim.py")


def test_an_error_fixture_is_served_with_its_own_status(sim: EdgeSimulator, token: str) -> None:
    # An error answer of Adobe's (a problem document) is served as Edge serves it, not as a 200 (reference §3.2)
    sim.add_fault(fixture="error-invalid-datastream.json", times=1)
    resp = interact(sim, token)
    body = json.loads((FIXTURE_DIR / "error-invalid-datastream.json").read_text())
    assert (resp.status_code, resp.headers["Content-Type"]) == (body["status"], "application/problem+json")
    assert resp.json() == body


@pytest.mark.parametrize(("status", "code"), [(422, "EXEG-0104-422"), (400, "EXEG-0102-400")])
def test_an_injected_validation_refusal_carries_its_report(
    sim: EdgeSimulator, token: str, status: int, code: str
) -> None:
    # A validation refusal comes with its report's list of messages (reference §3.2, EXEG-0104-422 "report attached")
    sim.add_fault(status=status, times=1)
    problem = assert_problem(interact(sim, token), status, code)
    assert isinstance(problem["report"]["errors"], list) and problem["report"]["errors"]
    assert all(isinstance(e, str) for e in problem["report"]["errors"])


def test_chaos(sim: EdgeSimulator, client: SimulatorClient, token: str) -> None:
    client.set_chaos(1.0, seed=7, kinds=("429", "503", "502", "504"))
    statuses = []
    for _ in range(12):
        resp = interact(sim, token)
        statuses.append(resp.status_code)
        if resp.status_code in (429, 503):
            value = resp.headers["Retry-After"]
            assert value in ("0", "1") or email.utils.parsedate_to_datetime(value)
    assert set(statuses) <= {429, 502, 503, 504} and len(set(statuses)) >= 3
    assert sim.stats()["chaos_applied"] == 12
    client.set_chaos(1.0, kinds=("drop",))
    with pytest.raises(requests.ConnectionError):
        interact(sim, token)
    client.set_chaos(0)
    assert all(interact(sim, token).status_code == 200 for _ in range(5))
    with pytest.raises(ValueError):
        client.set_chaos(0.5, kinds=("418",))


# ---- stats, concurrency, control client, CLI ------------------------------------------------------------------------


def test_stats_and_keep_alive(sim: EdgeSimulator, token: str) -> None:
    with requests.Session() as session:
        for _ in range(3):
            assert interact(sim, token, session=session).status_code == 200
        assert_problem(interact(sim, None, session=session), 401, "EXEG-0500-401")
    stats = sim.stats()
    assert stats["connections"] == 1
    assert stats["interact_requests"] == 4 and stats["ims_requests"] == 0
    assert stats["by_status"] == {200: 3, 401: 1}
    requests.post(sim.ims_url, data=ims_form(), timeout=5)
    assert sim.stats()["connections"] == 2 and sim.stats()["ims_requests"] == 1


def test_concurrent_requests_with_latency(sim: EdgeSimulator, token: str) -> None:
    sim.set_latency(0.3)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        codes = list(pool.map(lambda i: interact(sim, token, make_event(f"e{i}")).status_code, range(40)))
    elapsed = time.monotonic() - start
    assert codes == [200] * 40
    assert elapsed < 6.0, elapsed  # 40 x 0.3 s would take 12 s if answers were serialised
    assert sim.stats()["interact_requests"] == 40


def test_simulator_client_mirrors_api(sim: EdgeSimulator, client: SimulatorClient) -> None:
    client.wait_ready(timeout=2)
    assert client.health()["ok"] is True
    tok = client.issue_token()
    rule = client.add_fault(status=504, match_id="x-1")
    assert [f["id"] for f in client.faults()] == [rule]
    assert interact(sim, tok, make_event("x-1")).status_code == 504
    assert client.remove_fault(rule) is True
    client.set_latency(0.0)
    log = client.requests_log()
    assert len(log) == 1 and log[0]["xdm_id"] == "x-1" and log[0]["status"] == 504
    with pytest.raises(ValueError):
        client.add_fault(times=0)
    client.reset()
    assert client.requests_log() == [] and client.stats()["interact_requests"] == 0
    assert interact(sim, tok).status_code == 200  # tokens survive a plain reset
    client.reset(full=True)
    assert_problem(interact(sim, tok), 401, "EXEG-0502-401")
    assert client.visitors() == {}


def test_cli_runs_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.edge_sim", "--port", "0", "--latency", "0.01", "--no-auth"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        with SimulatorClient(url) as remote:
            remote.wait_ready()
            resp = requests.post(url + "/ee/v2/interact?datastreamId=ds-local", json=make_event(), timeout=5)
            assert resp.status_code == 200
            assert remote.stats()["interact_requests"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_an_http_0_9_request_gets_its_answer_without_headers(sim: EdgeSimulator) -> None:
    # GIVEN a request line without a version, HTTP/0.9 style (the answer has no status line or headers; Python's
    # http.server still reads a header block, hence the blank line)
    import socket

    host, port = sim.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /_sim/health\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk

    # THEN the body alone comes back (the simulator renders answers before its latency pause)
    assert json.loads(answer)["ok"] is True


def test_the_log_time_is_when_the_request_came_not_when_its_body_was_read(sim: EdgeSimulator, token: str) -> None:
    # GIVEN a call whose body comes 1 s after its request line and headers (as if the simulator's thread stalled
    # between them: the log's times are what tests compare with Edge's latency)
    body = json.dumps(make_event("evt-slow-body")).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in edge_headers(token).items())
    request = f"POST /ee/v2/interact?datastreamId=ds-local HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n"
    with socket.create_connection((sim.host, sim.port), timeout=10) as conn:
        conn.sendall(request.encode() + b"\r\n")
        time.sleep(1.0)
        body_sent_at = time.time()
        conn.sendall(body)
        assert conn.recv(12).startswith(b"HTTP/1.")
    # THEN the call is logged at its arrival, before the body was sent
    (entry,) = [e for e in sim.requests_log() if e["xdm_id"] == "evt-slow-body"]
    assert entry["time"] < body_sent_at
