"""Adobe and webhook credentials from Secrets Manager, cached through Powertools Parameters (contract §4-§5)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.utilities.parameters import SecretsProvider

from relay.errors import CredentialsError


@dataclass(frozen=True)
class AdobeCredentials:
    client_id: str
    client_secret: str = field(repr=False)
    org_id: str
    scopes: str


class CredentialsStore:
    """Reads the two secrets; `max_age` seconds of caching per execution environment (Powertools' cache)."""

    def __init__(
        self, secrets_client: Any, *, adobe_secret_id: str | None, webhook_secret_id: str | None, max_age: int
    ) -> None:
        self._provider = SecretsProvider(boto3_client=secrets_client)
        self._adobe_id = adobe_secret_id
        self._webhook_id = webhook_secret_id
        self._max_age = max_age
        self._lock = threading.Lock()

    def _read(self, secret_id: str, force: bool) -> dict[str, Any]:
        with self._lock:  # one read per cache period even when a batch's workers all start at once
            try:
                raw = self._provider.get(secret_id, max_age=self._max_age, force_fetch=force)
            except Exception as exc:  # GetParameterError wraps every client error
                raise CredentialsError(f"secret could not be read ({type(exc).__name__})") from None
        try:
            value = json.loads(raw if isinstance(raw, str) else bytes(raw).decode("utf-8"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise CredentialsError("secret is not JSON") from None
        if not isinstance(value, dict):
            raise CredentialsError("secret is not a JSON object")
        return value

    def adobe(self, *, force: bool = False) -> AdobeCredentials:
        if not self._adobe_id:
            raise CredentialsError("ADOBE_SECRET_ID is not configured")
        doc = self._read(self._adobe_id, force)
        missing = [k for k in ("clientId", "clientSecret", "orgId") if not isinstance(doc.get(k), str) or not doc[k]]
        if missing:
            raise CredentialsError(f"Adobe secret lacks {', '.join(missing)}")
        scopes = doc.get("scopes", "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session")
        if isinstance(scopes, list):
            scopes = ",".join(str(s) for s in scopes)
        return AdobeCredentials(doc["clientId"], doc["clientSecret"], doc["orgId"], str(scopes))

    def webhook_secrets(self, *, force: bool = False) -> list[str]:
        if not self._webhook_id:
            raise CredentialsError("WEBHOOK_SECRET_ID is not configured")
        secrets = self._read(self._webhook_id, force).get("secrets")
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) and s for s in secrets):
            raise CredentialsError('webhook secret must be {"secrets": ["whsec_...", ...]}')
        return list(secrets)
