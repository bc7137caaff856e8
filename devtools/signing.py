"""Sign webhook bodies the way a Standard Webhooks sender does."""

from __future__ import annotations

import base64
import os
import time
import uuid
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def new_webhook_secret() -> str:
    """Return a fresh ``whsec_<base64>`` secret (32 random bytes)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode("ascii")


def sign_webhook(
    body: bytes | str, secret: str, *, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """Return the ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers for ``body``.

    Parameters
    ----------
    body:
        The exact bytes (or text, UTF-8) that will be sent.
    secret:
        A ``whsec_...`` secret.
    msg_id:
        The message id; a fresh ``msg_<uuid>`` when omitted.
    timestamp:
        Unix seconds; now when omitted. Receivers reject timestamps more than 5 minutes away.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if timestamp is None else int(timestamp)
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), text)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}
