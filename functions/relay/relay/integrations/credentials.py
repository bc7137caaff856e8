"""Adobe and webhook credentials (contract §4-§5) and the identity key, from Secrets Manager, cached through Powertools
Parameters."""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aws_lambda_powertools.utilities.parameters import SecretsProvider
from botocore.exceptions import ClientError

from relay.clock import Moment
from relay.errors import CredentialsError

_T = TypeVar("_T")

WEBHOOK_KEY_BYTES = (24, 64)  # Standard Webhooks: secrets of 24 to 64 random bytes
MIN_IDENTITY_KEY_CHARS = 32  # the template generates 64 letters and digits (about 380 bits)
# A secret whose value was malformed is read again, past its cache period, at most this often: an operator's fix is
# taken within seconds, not minutes, and a broken secret costs one read per environment per period, not per event.
MALFORMED_REREAD_S = 10.0
_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,1024}")  # visible ASCII: clientId and orgId are sent as header values


def check_webhook_secrets(secrets: Any) -> list[str]:
    """The secrets, if each is `whsec_` + strict base64 of 24 to 64 bytes. The library would otherwise take
    `whsec_QQ` as a one-byte key (forged in 256 tries) and drop characters it cannot decode; a bad secret is a
    configuration error (503, logged as such), never a weak key. Problems name a secret's position, not its value."""
    if not isinstance(secrets, list) or not secrets:
        raise CredentialsError('webhook secret must be {"secrets": ["whsec_...", ...]}')
    low, high = WEBHOOK_KEY_BYTES
    for n, secret in enumerate(secrets, 1):
        try:
            if not isinstance(secret, str) or not secret.startswith("whsec_"):
                raise ValueError
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (ValueError, binascii.Error):
            key = b""
        if not low <= len(key) <= high:
            raise CredentialsError(
                f'webhook secret {n} of {len(secrets)} is not "whsec_" + base64 of {low} to {high} random bytes'
            )
    return list(secrets)


@dataclass(frozen=True)
class AdobeCredentials:
    client_id: str
    client_secret: str = field(repr=False)
    org_id: str
    scopes: str


def _adobe_credentials(doc: dict[str, Any]) -> AdobeCredentials:
    """The credentials, each with surrounding whitespace dropped (a value pasted with its line's end: Adobe's ids and
    secrets hold none). clientId and orgId travel as header values: anything else in them would fail every Edge call
    before it was sent, taken for an Edge outage, with no refusal from Edge to renew the token they were cached with."""
    values = {k: doc[k].strip() if isinstance(doc.get(k), str) else "" for k in ("clientId", "clientSecret", "orgId")}
    missing = [k for k, v in values.items() if not v]
    if missing:
        raise CredentialsError(f"Adobe secret lacks {', '.join(missing)}")
    unsendable = [k for k in ("clientId", "orgId") if not _HEADER_VALUE.fullmatch(values[k])]
    if unsendable:
        raise CredentialsError(
            f"Adobe secret's {' and '.join(unsendable)} must be visible ASCII with no spaces (a header value)"
        )
    scopes = doc.get("scopes", "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session")
    if isinstance(scopes, list):
        scopes = ",".join(str(s) for s in scopes)
    return AdobeCredentials(values["clientId"], values["clientSecret"], values["orgId"], str(scopes))


def _why(exc: BaseException) -> str:
    """The AWS error code behind Powertools' GetParameterError (ResourceNotFoundException, AccessDeniedException,
    DecryptionFailure, ...): what the operator must fix. Never the message, which may quote ARNs."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code") or "ClientError")
    return type(cause or exc).__name__


class CredentialsStore:
    """Reads the secrets; `max_age` seconds of caching per execution environment (Powertools' cache), the identity
    key once."""

    def __init__(
        self,
        secrets_client: Any,
        *,
        adobe_secret_id: str | None,
        webhook_secret_id: str | None,
        max_age: int,
        identity_key_secret_id: str | None = None,
        identity_key_label: str = "identity key secret (IDENTITY_KEY_SECRET_ID)",
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._provider = SecretsProvider(boto3_client=secrets_client)
        self._adobe_id = adobe_secret_id
        self._webhook_id = webhook_secret_id
        self._identity_key_id = identity_key_secret_id
        self._identity_key_label = identity_key_label  # how errors name it (relayctl: as its operator gave it)
        self._identity_key: bytes | None = None
        self._max_age = max_age
        self._lock = threading.Lock()
        # Secret id -> when a read of it gave a malformed value: cached by Powertools like a good one, so without this
        # the fix would wait for the cache period (SECRETS_MAX_AGE_SECONDS, 300 s by default). A `Moment`, passed by
        # either clock: whether the monotonic clock moves while Lambda freezes an environment is not documented, and a
        # fix must be taken within seconds between sparse invocations too.
        self._malformed: dict[str, Moment] = {}
        self._monotonic = monotonic
        self._wall = wall

    def _now(self) -> Moment:
        return Moment(self._monotonic(), self._wall())

    def _parsed(self, secret_id: str, force: bool, label: str, parse: Callable[[dict[str, Any]], _T]) -> _T:
        """`parse` of the secret's JSON object; a CredentialsError of either marks the secret malformed, a success
        clears the mark."""
        try:
            value = parse(self._read(secret_id, force, label))
        except CredentialsError:
            self._malformed.setdefault(secret_id, self._now())
            raise
        self._malformed.pop(secret_id, None)
        return value

    def _read(self, secret_id: str, force: bool, label: str) -> dict[str, Any]:
        with self._lock:  # one read per cache period even when a batch's workers all start at once
            since = self._malformed.get(secret_id)
            if since is not None and not since.within(MALFORMED_REREAD_S, self._now()):
                force = True  # its cached value was malformed: the operator may have fixed it since
                self._malformed[secret_id] = self._now()  # the other workers take this read's value
            try:
                raw = self._provider.get(secret_id, max_age=self._max_age, force_fetch=force)
            except Exception as exc:  # GetParameterError wraps every client error
                raise CredentialsError(f"{label} could not be read ({_why(exc)})") from None
        try:
            value = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise CredentialsError(f"{label} is not JSON") from None
        if not isinstance(value, dict):
            raise CredentialsError(f"{label} is not a JSON object")
        return value

    def adobe(self, *, force: bool = False) -> AdobeCredentials:
        if not self._adobe_id:
            raise CredentialsError("ADOBE_SECRET_ID is not configured")
        return self._parsed(self._adobe_id, force, "Adobe secret (ADOBE_SECRET_ID)", _adobe_credentials)

    def identity_key(self) -> bytes:
        """The HMAC key of identity ids (`{"key": "..."}`), read once per execution environment: it never changes
        (a new key would orphan every stored identity state), so a later Secrets Manager outage cannot touch it."""
        if self._identity_key is None:
            if not self._identity_key_id:
                raise CredentialsError("IDENTITY_KEY_SECRET_ID is not configured")
            self._identity_key = self._parsed(self._identity_key_id, False, self._identity_key_label, self._key_of)
        return self._identity_key

    def _key_of(self, doc: dict[str, Any]) -> bytes:
        key = doc.get("key")
        if not isinstance(key, str) or len(key) < MIN_IDENTITY_KEY_CHARS:
            raise CredentialsError(
                f'{self._identity_key_label} must be {{"key": "..."}} with at least {MIN_IDENTITY_KEY_CHARS} characters'
            )
        return key.encode("utf-8")

    def webhook_secrets(self, *, force: bool = False) -> list[str]:
        if not self._webhook_id:
            raise CredentialsError("WEBHOOK_SECRET_ID is not configured")
        return self._parsed(
            self._webhook_id,
            force,
            "webhook secret (WEBHOOK_SECRET_ID)",
            lambda doc: check_webhook_secrets(doc.get("secrets")),
        )
