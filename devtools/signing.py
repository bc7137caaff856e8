"""Sign webhook bodies the way a Standard Webhooks sender does.

`python -m devtools.signing --url <ApiUrl> --body '<json>'` prints a signed `curl` command for a deployed stack: a
first event through the webhook path. The signing secret is read from standard input (one line, `whsec_...`), never
from the command line, where the shell history and the process list would keep it."""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import cast

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
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if timestamp is None else int(timestamp)
    signer = Webhook(secret)
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        # The library signs text only; bytes that are not UTF-8 (a hand-built event's, to see the relay's 400 for
        # them) are signed over their exact bytes as the relay checks them
        from relay.webhook import _SignedBytes

        text, signer = cast(bytes, body).decode("utf-8", "surrogateescape"), _SignedBytes(secret)
    signature = signer.sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), text)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def curl_command(url: str, body: str, headers: Mapping[str, str]) -> str:
    """A `curl` command that POSTs `body` to `url` with `headers`, quoted for a POSIX shell."""
    parts = ["curl", "-sS", "-X", "POST", url, "-H", "content-type: application/json"]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", body]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.signing", description=__doc__.split("\n\n")[1])
    parser.add_argument("--url", required=True, help="the webhook URL: the stack's ApiUrl output (ending in /events)")
    parser.add_argument("--body", required=True, help="the event, as JSON (signed and sent byte for byte)")
    args = parser.parse_args(argv)
    secret = sys.stdin.readline().strip()
    if not secret.startswith("whsec_"):
        parser.error('standard input must be one line holding a signing secret ("whsec_...")')
    print(curl_command(args.url, args.body, sign_webhook(args.body, secret)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
