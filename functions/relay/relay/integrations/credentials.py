"""Adobe and webhook credentials (contract §4-§5) and the identity key, from Secrets Manager, cached through Powertools
Parameters."""

from __future__ import annotations

import base64
import binascii
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.utilities.parameters import SecretsProvider
from botocore.exceptions import ClientError

from relay.errors import CredentialsError

WEBHOOK_KEY_BYTES = (24, 64)  # Standard Webhooks: secrets of 24 to 64 random bytes
MIN_IDENTITY_KEY_CHARS = 32  # the template generates 64 letters and digits (about 380 bits)


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
    ) -> None:
        self._provider = SecretsProvider(boto3_client=secrets_client)
        self._adobe_id = adobe_secret_id
        self._webhook_id = webhook_secret_id
        self._identity_key_id = identity_key_secret_id
        self._identity_key_label = identity_key_label  # how errors name it (relayctl: as its operator gave it)
        self._identity_key: bytes | None = None
        self._max_age = max_age
        self._lock = threading.Lock()

    def _read(self, secret_id: str, force: bool, label: str) -> dict[str, Any]:
        with self._lock:  # one read per cache period even when a batch's workers all start at once
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
        doc = self._read(self._adobe_id, force, "Adobe secret (ADOBE_SECRET_ID)")
        missing = [k for k in ("clientId", "clientSecret", "orgId") if not isinstance(doc.get(k), str) or not doc[k]]
        if missing:
            raise CredentialsError(f"Adobe secret lacks {', '.join(missing)}")
        scopes = doc.get("scopes", "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session")
        if isinstance(scopes, list):
            scopes = ",".join(str(s) for s in scopes)
        return AdobeCredentials(doc["clientId"], doc["clientSecret"], doc["orgId"], str(scopes))

    def identity_key(self) -> bytes:
        """The HMAC key of identity ids (`{"key": "..."}`), read once per execution environment: it never changes
        (a new key would orphan every stored identity state), so a later Secrets Manager outage cannot touch it."""
        if self._identity_key is None:
            if not self._identity_key_id:
                raise CredentialsError("IDENTITY_KEY_SECRET_ID is not configured")
            doc = self._read(self._identity_key_id, False, self._identity_key_label)
            key = doc.get("key")
            if not isinstance(key, str) or len(key) < MIN_IDENTITY_KEY_CHARS:
                raise CredentialsError(
                    f'{self._identity_key_label} must be {{"key": "..."}} with at least {MIN_IDENTITY_KEY_CHARS} '
                    "characters"
                )
            self._identity_key = key.encode("utf-8")
        return self._identity_key

    def webhook_secrets(self, *, force: bool = False) -> list[str]:
        if not self._webhook_id:
            raise CredentialsError("WEBHOOK_SECRET_ID is not configured")
        doc = self._read(self._webhook_id, force, "webhook secret (WEBHOOK_SECRET_ID)")
        return check_webhook_secrets(doc.get("secrets"))
