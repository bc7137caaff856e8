"""relay.settings.load_settings: defaults, one ConfigurationError naming every bad variable, URL rules."""

from __future__ import annotations

import pytest
from relay.errors import ConfigurationError
from relay.settings import load_settings

MINIMAL = {
    "HANDLES_TABLE": "relay-handles",
    "DATASTREAM_ID": "ds-1",
    "ADOBE_SECRET_ID": "adobe-secret",
    "WEBHOOK_SECRET_ID": "webhook-secret",
}


def problems_of(env: dict[str, str]) -> dict[str, str]:
    with pytest.raises(ConfigurationError) as info:
        load_settings(env)
    return info.value.problems


def test_load_settings_defaults():
    # GIVEN only the required variables
    env = dict(MINIMAL)

    # WHEN
    s = load_settings(env)

    # THEN every optional variable has its documented default
    assert s.handles_table == "relay-handles"
    assert s.datastream_id == "ds-1"
    assert s.adobe_secret_id == "adobe-secret"
    assert s.webhook_secret_id == "webhook-secret"
    assert s.edge_base_url == "https://server.adobedc.net"
    assert s.edge_auth == "ims"
    assert s.edge_hint_url_template == "{base}/ee/{hint}/v2/interact"
    assert s.ims_token_url == "https://ims-na1.adobelogin.com/ims/token/v3"
    assert s.webhook_auth == "standard-webhooks"
    assert s.retry_queue_url is None
    assert s.result_ttl_days == 30
    assert s.batch_concurrency == 16
    assert s.webhook_deadline_s == 5.0
    assert s.edge_connect_timeout_s == 3.05
    assert s.edge_read_timeout_s == 5.0
    assert s.edge_max_attempts == 5
    assert s.safety_margin_s == 2.0
    assert s.secrets_max_age_s == 300
    assert s.interact_url == "https://server.adobedc.net/ee/v2/interact"
    assert s.hinted_url("or2") == "https://server.adobedc.net/ee/or2/v2/interact"


def test_load_settings_names_every_bad_variable_at_once():
    # GIVEN no table, no datastream, ims auth without its secret, and bad integers
    env = {
        "WEBHOOK_SECRET_ID": "webhook-secret",
        "EDGE_AUTH": "ims",
        "RESULT_TTL_DAYS": "thirty",
        "EDGE_MAX_ATTEMPTS": "0",
        "BATCH_CONCURRENCY": "65",
    }

    # WHEN
    with pytest.raises(ConfigurationError) as info:
        load_settings(env)

    # THEN one error names all of them, and the message lists them sorted
    assert info.value.problems == {
        "HANDLES_TABLE": "is required",
        "DATASTREAM_ID": "is required",
        "ADOBE_SECRET_ID": "is required when EDGE_AUTH=ims",
        "RESULT_TTL_DAYS": "must be an integer between 1 and 3650",
        "EDGE_MAX_ATTEMPTS": "must be between 1 and 20",
        "BATCH_CONCURRENCY": "must be between 1 and 64",
    }
    assert str(info.value) == (
        "invalid configuration: ADOBE_SECRET_ID: is required when EDGE_AUTH=ims; BATCH_CONCURRENCY: must be between "
        "1 and 64; DATASTREAM_ID: is required; EDGE_MAX_ATTEMPTS: must be between 1 and 20; HANDLES_TABLE: is "
        "required; RESULT_TTL_DAYS: must be an integer between 1 and 3650"
    )


def test_load_settings_names_bad_edge_auth_webhook_auth_and_http_base_url_together():
    # GIVEN unknown auth modes and a plain-http, non-loopback Edge host
    env = {
        **MINIMAL,
        "HANDLES_TABLE": "  ",
        "EDGE_AUTH": "oauth",
        "WEBHOOK_AUTH": "hmac",
        "EDGE_BASE_URL": "http://edge.example.com",
        "IMS_TOKEN_URL": "ftp://ims.example.com/token",
    }

    # WHEN
    problems = problems_of(env)

    # THEN
    expected = {
        "HANDLES_TABLE": "is required",
        "EDGE_AUTH": "must be one of ims, none",
        "WEBHOOK_AUTH": "must be one of standard-webhooks, none",
        "EDGE_BASE_URL": "must be an https URL (http only for loopback)",
        "IMS_TOKEN_URL": "must be an https URL (http only for loopback)",
    }
    assert {name: problems[name] for name in expected} == expected


@pytest.mark.parametrize(
    "base", ["https://server.adobedc.net/ee/v2/interact", "https://server.adobedc.net/ee", "https://h.example?x=1"]
)
def test_an_edge_base_url_with_a_path_is_a_configuration_error(base: str) -> None:
    # GIVEN the interact endpoint's full URL where only the host belongs (every call would be a 404 rejection)
    problems = problems_of({**MINIMAL, "EDGE_BASE_URL": base})

    # THEN it is named as the configuration error it is
    assert problems["EDGE_BASE_URL"].startswith("must be the host only")


def test_load_settings_does_not_blame_the_default_hint_template_for_a_bad_base_url():
    # GIVEN a plain-http, non-loopback Edge host and no EDGE_HINT_URL_TEMPLATE
    env = {**MINIMAL, "EDGE_BASE_URL": "http://edge.example.com"}

    # WHEN
    problems = problems_of(env)

    # THEN only the variable that was set wrongly is named
    assert problems == {"EDGE_BASE_URL": "must be an https URL (http only for loopback)"}


def test_load_settings_requires_webhook_secret_only_with_standard_webhooks():
    # GIVEN no webhook secret
    env = {k: v for k, v in MINIMAL.items() if k != "WEBHOOK_SECRET_ID"}

    # WHEN / THEN
    assert problems_of(env) == {"WEBHOOK_SECRET_ID": "is required when WEBHOOK_AUTH=standard-webhooks"}
    assert load_settings({**env, "WEBHOOK_AUTH": "none"}).webhook_secret_id is None


def test_load_settings_edge_auth_none_needs_no_adobe_secret():
    # GIVEN EDGE_AUTH=none and no Adobe secret
    env = {k: v for k, v in MINIMAL.items() if k != "ADOBE_SECRET_ID"} | {"EDGE_AUTH": "none"}
    env["EDGE_BASE_URL"] = "https://edge.adobedc.net"  # the host that takes calls without a token

    # WHEN
    s = load_settings(env)

    # THEN
    assert s.edge_auth == "none"
    assert s.adobe_secret_id is None


@pytest.mark.parametrize("datastream", ["ds/../x", "ds-1\nx"])
def test_load_settings_rejects_a_malformed_datastream_id(datastream: str) -> None:
    # GIVEN
    env = {**MINIMAL, "DATASTREAM_ID": datastream}

    # WHEN / THEN
    assert problems_of(env) == {"DATASTREAM_ID": "must be a datastream id (letters, digits, '-', '_', ':', '.')"}


@pytest.mark.parametrize("table", ["my table!", "ab", "x" * 256, "arn:aws:dynamodb:eu-west-1:123456789012:table/a b"])
def test_a_table_name_dynamodb_would_refuse_is_a_configuration_error(table: str) -> None:
    # GIVEN a HANDLES_TABLE that is neither a table name nor a table ARN: every claim would fail, every webhook be
    # answered 202 (queued) and every queued event end in the dead-letter queue
    env = {**MINIMAL, "HANDLES_TABLE": table}

    # WHEN / THEN the invocation fails naming it, as for any other bad variable (contract §3)
    assert problems_of(env) == {
        "HANDLES_TABLE": "must be a DynamoDB table name (3-255 of letters, digits, '_', '-', '.') or a table ARN"
    }


@pytest.mark.parametrize(
    "table", ["relay-handles", "Relay_Handles.v2", "arn:aws:dynamodb:eu-west-1:123456789012:table/relay-handles"]
)
def test_a_table_name_or_arn_is_taken(table: str) -> None:
    assert load_settings({**MINIMAL, "HANDLES_TABLE": table}).handles_table == table


def test_allowed_datastream_ids_are_read_as_a_set_and_empty_means_any() -> None:
    assert load_settings(MINIMAL).allowed_datastream_ids == frozenset()
    listed = load_settings({**MINIMAL, "ALLOWED_DATASTREAM_IDS": " ds-a, ds:b.1 ,,ds-a"})
    assert listed.allowed_datastream_ids == frozenset({"ds-a", "ds:b.1"})


def test_a_malformed_allowed_datastream_id_is_a_configuration_error() -> None:
    env = {**MINIMAL, "ALLOWED_DATASTREAM_IDS": "ds-a,ds/../x"}
    assert problems_of(env) == {"ALLOWED_DATASTREAM_IDS": "must be datastream ids separated by commas"}


@pytest.mark.parametrize(
    "base",
    ["http://127.0.0.1:4566", "http://localhost:8080/", "http://[::1]:9000"],
)
def test_load_settings_allows_http_on_loopback(base):
    # GIVEN a local simulator on loopback
    env = {**MINIMAL, "EDGE_BASE_URL": base, "IMS_TOKEN_URL": "http://127.0.0.1:4566/ims/token/v3"}

    # WHEN
    s = load_settings(env)

    # THEN the URL is kept, without a trailing slash
    assert s.edge_base_url == base.rstrip("/")
    assert s.interact_url == f"{base.rstrip('/')}/ee/v2/interact"
    assert s.ims_token_url == "http://127.0.0.1:4566/ims/token/v3"


@pytest.mark.parametrize("base", ["http://localhost.example.com", "http://10.0.0.1:8080", "https://"])
def test_load_settings_refuses_non_loopback_http_and_hostless_urls(base):
    # GIVEN
    env = {**MINIMAL, "EDGE_BASE_URL": base}

    # WHEN
    problems = problems_of(env)

    # THEN
    assert problems["EDGE_BASE_URL"] == "must be an https URL (http only for loopback)"


@pytest.mark.parametrize("name", ["EDGE_BASE_URL", "IMS_TOKEN_URL"])
@pytest.mark.parametrize("url", ["https://[edge", "https://edge.adobedc.net:443x", "https://edge.adobedc.net:99999"])
def test_a_url_the_parser_refuses_is_named_with_every_other_bad_variable(name: str, url: str) -> None:
    # GIVEN a URL urlsplit cannot read (it raises ValueError), and a required variable missing
    env = {k: v for k, v in {**MINIMAL, name: url}.items() if k != "HANDLES_TABLE"}

    # WHEN
    problems = problems_of(env)

    # THEN the one configuration error names both, rather than a bare ValueError naming neither
    assert problems[name] == "must be an https URL (http only for loopback)"
    assert "HANDLES_TABLE" in problems


@pytest.mark.parametrize("base", [None, "https://server.adobedc.net", "https://SERVER.adobedc.net/"])
def test_no_edge_auth_with_the_authenticated_host_is_a_configuration_error(base: str | None) -> None:
    # GIVEN EDGE_AUTH=none and Adobe's authenticated host, by default or given (the template's Rules refuse the same)
    env = {**MINIMAL, "EDGE_AUTH": "none"} | ({"EDGE_BASE_URL": base} if base else {})

    # WHEN / THEN it is refused, naming the host to use, rather than every call refused for want of a token
    assert "use https://edge.adobedc.net" in problems_of(env)["EDGE_BASE_URL"]
    # AND the unauthenticated host, or a simulator on loopback, is taken
    assert load_settings({**env, "EDGE_BASE_URL": "https://edge.adobedc.net"}).edge_auth == "none"
    assert load_settings({**env, "EDGE_BASE_URL": "http://127.0.0.1:8080"}).edge_auth == "none"


def test_load_settings_subdomain_hint_template():
    # GIVEN Adobe's Node-sample form for the authenticated host
    env = {**MINIMAL, "EDGE_HINT_URL_TEMPLATE": "https://{hint}.server.adobedc.net/ee/v2/interact"}

    # WHEN
    s = load_settings(env)

    # THEN
    assert s.hinted_url("va6") == "https://va6.server.adobedc.net/ee/v2/interact"
    assert s.interact_url == "https://server.adobedc.net/ee/v2/interact"


def test_load_settings_default_hint_template_follows_the_base_url():
    # GIVEN the unauthenticated host
    env = {**MINIMAL, "EDGE_AUTH": "none", "EDGE_BASE_URL": "https://edge.adobedc.net/"}

    # WHEN
    s = load_settings(env)

    # THEN
    assert s.hinted_url("irl1") == "https://edge.adobedc.net/ee/irl1/v2/interact"


def test_load_settings_hint_routing_can_be_turned_off():
    # GIVEN hint routing turned off (a host that refuses hinted paths)
    env = {**MINIMAL, "EDGE_HINT_URL_TEMPLATE": "none"}

    # WHEN
    s = load_settings(env)

    # THEN every call goes to the plain URL, whatever the hint
    assert s.edge_hint_url_template is None
    assert s.hinted_url("or2") == s.interact_url == "https://server.adobedc.net/ee/v2/interact"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{base}/ee/v2/interact", "must contain {hint}, or be none"),
        ("{base}/ee/{hint}/{region}/v2/interact", "may only use {base} and {hint}"),
        ("http://{hint}.server.adobedc.net/ee/v2/interact", "must be an https URL (http only for loopback)"),
    ],
)
def test_load_settings_rejects_bad_hint_templates(template, message):
    # GIVEN
    env = {**MINIMAL, "EDGE_HINT_URL_TEMPLATE": template}

    # WHEN / THEN
    assert problems_of(env) == {"EDGE_HINT_URL_TEMPLATE": message}


def test_load_settings_converts_milliseconds_to_seconds():
    # GIVEN
    env = {
        **MINIMAL,
        "WEBHOOK_DEADLINE_MS": "8000",
        "EDGE_CONNECT_TIMEOUT_MS": "500",
        "EDGE_READ_TIMEOUT_MS": "1500",
        "SAFETY_MARGIN_MS": "0",
        "EDGE_MAX_ATTEMPTS": " 3 ",
        "RESULT_TTL_DAYS": "7",
        "RETRY_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/retry",
    }

    # WHEN
    s = load_settings(env)

    # THEN
    assert (s.webhook_deadline_s, s.edge_connect_timeout_s, s.edge_read_timeout_s, s.safety_margin_s) == (
        8.0,
        0.5,
        1.5,
        0.0,
    )
    assert s.edge_max_attempts == 3
    assert s.result_ttl_days == 7
    assert s.retry_queue_url == "https://sqs.eu-west-1.amazonaws.com/123456789012/retry"


def test_http_session_reads_the_environment_per_request_only_when_a_proxy_is_set(monkeypatch):
    from relay.runtime import new_http_session

    # GIVEN no proxy variables (Lambda's case): requests does not scan os.environ and ~/.netrc on every request
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    session = new_http_session(16)
    assert session.trust_env is False
    # AND its pool holds one connection per concurrent Edge call
    adapter = session.get_adapter("https://server.adobedc.net")
    assert (getattr(adapter, "_pool_maxsize", None), getattr(adapter, "_pool_block", None)) == (16, True)

    # GIVEN a proxy is configured: requests' own proxy handling (NO_PROXY included) stays on
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert new_http_session(16).trust_env is True


@pytest.mark.parametrize("level", ["DEBUG", "info", "WARN", "warning", "ERROR", "CRITICAL"])
def test_a_log_level_powertools_accepts_is_valid(level: str) -> None:
    # WHEN / THEN: no configuration error
    try:
        load_settings({**MINIMAL, "POWERTOOLS_LOG_LEVEL": level})
    except ConfigurationError as exc:
        pytest.fail(f"{level!r} refused: {exc.problems}")


def test_a_log_level_powertools_would_refuse_is_named_with_the_other_problems() -> None:
    # WHEN / THEN
    env = {"POWERTOOLS_LOG_LEVEL": "LOUD", "DATASTREAM_ID": "ds-1", "EDGE_AUTH": "none"}
    assert problems_of({**env, "EDGE_BASE_URL": "https://edge.adobedc.net"}) == {
        "HANDLES_TABLE": "is required",
        "WEBHOOK_SECRET_ID": "is required when WEBHOOK_AUTH=standard-webhooks",
        "POWERTOOLS_LOG_LEVEL": "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    }


def test_secrets_manager_calls_fail_within_seconds_while_other_clients_keep_the_general_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN the function's clients (built offline; nothing is called)
    from relay.integrations.aws_clients import SQS_WORST_CASE_S, build_clients

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    clients = build_clients(32)

    # WHEN / THEN a secret read (done under the token lock, inside an event's deadline) gives up after 2 short
    # attempts, about 6.5 s at worst, while DynamoDB keeps 6 attempts and the pool sized for the workers
    secrets, dynamodb = clients["secretsmanager"].meta.config, clients["dynamodb"].meta.config
    assert (secrets.connect_timeout, secrets.read_timeout, secrets.retries["total_max_attempts"]) == (1, 2, 2)
    assert (dynamodb.connect_timeout, dynamodb.read_timeout, dynamodb.retries["total_max_attempts"]) == (2, 5, 6)
    assert secrets.max_pool_connections == dynamodb.max_pool_connections == 32
    # and SQS (a webhook's fallback, postponed records: called late, when something already failed) gives up within
    # SQS_WORST_CASE_S, so a stalled SQS cannot outlast the Lambda timeout
    sqs = clients["sqs"].meta.config
    assert (sqs.connect_timeout, sqs.read_timeout, sqs.retries["total_max_attempts"]) == (0.5, 1, 2)
    assert 2 * (sqs.connect_timeout + sqs.read_timeout) + 1 <= SQS_WORST_CASE_S


def test_a_webhook_deadline_too_short_to_try_edge_is_a_configuration_error() -> None:
    # GIVEN a deadline shorter than the 0.75 s the webhook keeps back to queue the event (Edge would never be called)
    problems = problems_of({**MINIMAL, "WEBHOOK_DEADLINE_MS": "600"})

    # THEN
    assert problems == {"WEBHOOK_DEADLINE_MS": "must be between 1000 and 29000"}
