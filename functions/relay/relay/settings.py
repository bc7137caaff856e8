"""Typed, validated settings read from the environment on first use (never at import time)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from relay.errors import ConfigurationError

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# A datastream id, as a query parameter, an SQS attribute or DATASTREAM_ID. Used with fullmatch (`^...$` would let a
# final "\n" through).
DATASTREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.-]{0,127}")
# What DynamoDB takes as `TableName`: a table name, or a table ARN
TABLE_RE = re.compile(r"[A-Za-z0-9_.-]{3,255}|arn:aws[a-z-]*:dynamodb:[a-z0-9-]+:[0-9]{12}:table/[A-Za-z0-9_.-]{3,255}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def valid_log_level(value: str) -> bool:
    """A POWERTOOLS_LOG_LEVEL that Powertools' Logger accepts (any case; WARN is WARNING)."""
    return value.upper() in (*LOG_LEVELS, "WARN")


@dataclass(frozen=True)
class Settings:
    handles_table: str
    datastream_id: str
    adobe_secret_id: str | None
    webhook_secret_id: str | None
    edge_base_url: str
    edge_auth: str  # "ims" | "none"
    edge_hint_url_template: str | None  # None (EDGE_HINT_URL_TEMPLATE=none): hints are kept but never route a call
    ims_token_url: str
    webhook_auth: str  # "standard-webhooks" | "none"
    retry_queue_url: str | None
    result_ttl_days: int
    batch_concurrency: int
    webhook_deadline_s: float
    edge_connect_timeout_s: float
    edge_read_timeout_s: float
    edge_max_attempts: int
    safety_margin_s: float
    secrets_max_age_s: int
    queue_visibility_timeout_s: int  # the trigger queue's VisibilityTimeout: when a record sent back returns
    identity_key_secret_id: str | None = None  # the HMAC key of identity ids; unset: plain SHA-256 (README)
    # ALLOWED_DATASTREAM_IDS: the datastreams an event may name besides `datastream_id`; empty: any (contract §2)
    allowed_datastream_ids: frozenset[str] = frozenset()

    @property
    def interact_url(self) -> str:
        return f"{self.edge_base_url}/ee/v2/interact"

    def hinted_url(self, hint: str) -> str:
        if self.edge_hint_url_template is None:
            return self.interact_url
        return self.edge_hint_url_template.format(base=self.edge_base_url, hint=hint)


def _url(problems: dict[str, str], name: str, value: str, *, host_only: bool = False) -> str:
    try:
        parts = urlsplit(value)
        hostname, _ = parts.hostname, parts.port  # each raises ValueError for what no request could use
    except ValueError:  # e.g. "https://[edge" (an unclosed IPv6 bracket) or "https://edge:443x" (not a port)
        problems[name] = "must be an https URL (http only for loopback)"
        return value
    if host_only and (parts.path.strip("/") or parts.query or parts.fragment):
        # The relay adds /ee/v2/interact itself: a base with a path would make every call a 404, every event a
        # stored rejection, rather than one clear configuration error.
        problems[name] = "must be the host only, e.g. https://server.adobedc.net (no path: /ee/v2/interact is added)"
        return value
    if parts.scheme == "https" and hostname:
        return value.rstrip("/")
    if parts.scheme == "http" and hostname in _LOOPBACK_HOSTS:
        return value.rstrip("/")  # a local simulator on loopback
    problems[name] = "must be an https URL (http only for loopback)"
    return value


def _int(problems: dict[str, str], env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        problems[name] = f"must be an integer between {lo} and {hi}"
        return default
    if not lo <= value <= hi:
        problems[name] = f"must be between {lo} and {hi}"
    return value


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate every variable and raise one ConfigurationError naming all bad ones."""
    problems: dict[str, str] = {}

    def required(name: str) -> str:
        value = env.get(name, "").strip()
        if not value:
            problems[name] = "is required"
        return value

    def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = env.get(name, "").strip() or default
        if value not in allowed:
            problems[name] = f"must be one of {', '.join(allowed)}"
        return value

    table = required("HANDLES_TABLE")
    if table and not TABLE_RE.fullmatch(table):
        # DynamoDB would refuse every call: the webhook would queue every event (202) and the batch dead-letter them.
        problems["HANDLES_TABLE"] = (
            "must be a DynamoDB table name (3-255 of letters, digits, '_', '-', '.') or a table ARN"
        )
    datastream = required("DATASTREAM_ID")
    if datastream and not DATASTREAM_ID_RE.fullmatch(datastream):
        problems["DATASTREAM_ID"] = "must be a datastream id (letters, digits, '-', '_', ':', '.')"
    edge_auth = choice("EDGE_AUTH", "ims", ("ims", "none"))
    webhook_auth = choice("WEBHOOK_AUTH", "standard-webhooks", ("standard-webhooks", "none"))
    adobe_secret = env.get("ADOBE_SECRET_ID", "").strip() or None
    webhook_secret = env.get("WEBHOOK_SECRET_ID", "").strip() or None
    identity_key_secret = env.get("IDENTITY_KEY_SECRET_ID", "").strip() or None
    for name, value, needed, because in (
        ("ADOBE_SECRET_ID", adobe_secret, edge_auth == "ims", "EDGE_AUTH=ims"),
        ("WEBHOOK_SECRET_ID", webhook_secret, webhook_auth == "standard-webhooks", "WEBHOOK_AUTH=standard-webhooks"),
    ):
        if needed and not value:
            problems[name] = f"is required when {because}"
    base = _url(
        problems,
        "EDGE_BASE_URL",
        env.get("EDGE_BASE_URL", "").strip() or "https://server.adobedc.net",
        host_only=True,
    )
    if edge_auth == "none" and "EDGE_BASE_URL" not in problems and urlsplit(base).hostname == "server.adobedc.net":
        # As the template's rule: every call would be refused for want of a token, every event end in the DLQ.
        problems["EDGE_BASE_URL"] = (
            "must not be https://server.adobedc.net (the default) with EDGE_AUTH=none: that host refuses every call "
            "without an IMS token; use https://edge.adobedc.net"
        )
    ims = _url(
        problems,
        "IMS_TOKEN_URL",
        env.get("IMS_TOKEN_URL", "").strip() or "https://ims-na1.adobelogin.com/ims/token/v3",
    )
    given = env.get("EDGE_HINT_URL_TEMPLATE", "").strip() or "{base}/ee/{hint}/v2/interact"
    # "none": every call goes to {base}/ee/v2/interact; hints are still kept and sent back as state entries.
    template = None if given == "none" else given
    if template is not None and "{hint}" not in template:
        problems["EDGE_HINT_URL_TEMPLATE"] = "must contain {hint}, or be none"
    elif template is not None and ("EDGE_BASE_URL" not in problems or "{base}" not in template):
        try:
            _url(problems, "EDGE_HINT_URL_TEMPLATE", template.format(base=base, hint="or2"))
        except (KeyError, IndexError, ValueError):
            problems["EDGE_HINT_URL_TEMPLATE"] = "may only use {base} and {hint}"
    # The webhook's `?datastreamId=` is not covered by its signature: a listed set keeps a replayed request from
    # choosing any other datastream (README, "Security").
    allowed: set[str] = set()
    for entry in env.get("ALLOWED_DATASTREAM_IDS", "").split(","):
        entry = entry.strip()
        if entry and not DATASTREAM_ID_RE.fullmatch(entry):
            problems["ALLOWED_DATASTREAM_IDS"] = "must be datastream ids separated by commas"
        elif entry:
            allowed.add(entry)
    # Not checked as a URL: `sam local invoke` passes the queue's logical id for `!Ref EventsQueue`, and emulators'
    # queue URLs name all sorts of hosts; an SQS batch never uses it. A send that fails logs SQS's own error code.
    queue = env.get("RETRY_QUEUE_URL", "").strip() or None
    ttl_days = _int(problems, env, "RESULT_TTL_DAYS", 30, 1, 3650)
    concurrency = _int(problems, env, "BATCH_CONCURRENCY", 16, 1, 64)
    # At least 1 s: the webhook keeps 0.75 s of it back to queue the event if Edge stays down.
    deadline_ms = _int(problems, env, "WEBHOOK_DEADLINE_MS", 5000, 1000, 29000)
    connect_ms = _int(problems, env, "EDGE_CONNECT_TIMEOUT_MS", 3050, 100, 30000)
    read_ms = _int(problems, env, "EDGE_READ_TIMEOUT_MS", 5000, 100, 60000)
    attempts = _int(problems, env, "EDGE_MAX_ATTEMPTS", 5, 1, 20)
    margin_ms = _int(problems, env, "SAFETY_MARGIN_MS", 2000, 0, 60000)
    secrets_age = _int(problems, env, "SECRETS_MAX_AGE_SECONDS", 300, 0, 86400)
    visibility = _int(problems, env, "QUEUE_VISIBILITY_TIMEOUT_SECONDS", 180, 0, 43200)
    level = env.get("POWERTOOLS_LOG_LEVEL", "")
    if level and not valid_log_level(level):
        problems["POWERTOOLS_LOG_LEVEL"] = f"must be one of {', '.join(LOG_LEVELS)}"
    if problems:
        raise ConfigurationError(problems)
    return Settings(
        handles_table=table,
        datastream_id=datastream,
        adobe_secret_id=adobe_secret,
        webhook_secret_id=webhook_secret,
        edge_base_url=base,
        edge_auth=edge_auth,
        edge_hint_url_template=template,
        ims_token_url=ims,
        webhook_auth=webhook_auth,
        retry_queue_url=queue,
        result_ttl_days=ttl_days,
        batch_concurrency=concurrency,
        webhook_deadline_s=deadline_ms / 1000,
        edge_connect_timeout_s=connect_ms / 1000,
        edge_read_timeout_s=read_ms / 1000,
        edge_max_attempts=attempts,
        safety_margin_s=margin_ms / 1000,
        secrets_max_age_s=secrets_age,
        queue_visibility_timeout_s=visibility,
        identity_key_secret_id=identity_key_secret,
        allowed_datastream_ids=frozenset(allowed),
    )


@cache
def get_settings() -> Settings:
    return load_settings(os.environ)
