"""`sam local invoke -e <file>` without Docker: one event file (a sample in `events/`, or your own) through the
function's real entry point, `relay.handler.lambda_handler`, in this process, against the local stack `make serve`
runs. Run it in another shell after pasting the `export` lines `make serve` prints:

    .venv/bin/python -m devtools.invoke events/webhook-order.json

A webhook event's signature headers are made again with the stack's webhook secret, read from its Secrets Manager
(`WEBHOOK_SECRET_ID`; a sample's are placeholders, and a real one expires after 5 minutes); its body and webhook-id
are kept. Prints the function's answer as JSON, on the last line (the function's log lines, on stdout as in Lambda,
come before it)."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devtools.lambda_context import new_context
from devtools.signing import sign_webhook


def signed(event: dict[str, Any], secret: str) -> dict[str, Any]:
    """The HTTP API event with fresh Standard Webhooks headers for its body (same webhook-id when it has one)."""
    headers = dict(event.get("headers") or {})
    body = event.get("body") or ""
    raw: bytes | str = body
    if event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            pass  # not the base64 it claims to be (to see the relay's 401 for it): its text is what there is to sign
    headers.update(sign_webhook(raw, secret, msg_id=headers.get("webhook-id")))
    return {**event, "headers": headers}


def webhook_secret() -> str:
    """The first secret of the stack's webhook secret (`{"secrets": [...]}`), as the function reads it."""
    import boto3

    value = boto3.client("secretsmanager").get_secret_value(SecretId=os.environ["WEBHOOK_SECRET_ID"])["SecretString"]
    return str(json.loads(value)["secrets"][0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.invoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("event", type=Path, help="an event file, as `sam local invoke -e` takes")
    parser.add_argument("--timeout", type=float, default=30.0, help="the invocation's time, in seconds (default 30)")
    args = parser.parse_args(argv)
    if "HANDLES_TABLE" not in os.environ:
        print(
            "no function environment: paste the export lines `make serve` prints, then run this again", file=sys.stderr
        )
        return 2
    try:
        text = args.event.read_text(encoding="utf-8")
    except OSError as exc:  # `make invoke EVENT=nope.json`: the file named, one line, not a traceback
        print(f"{parser.prog}: cannot read the event file {args.event}: {exc.strerror}", file=sys.stderr)
        return 2
    event = json.loads(text)
    if "Records" not in event and os.environ.get("WEBHOOK_AUTH", "standard-webhooks") != "none":
        event = signed(event, webhook_secret())
    from relay.handler import lambda_handler  # after the environment is in place: it reads it at import

    answer = lambda_handler(event, new_context(args.timeout))
    print(json.dumps(answer, ensure_ascii=False))  # one line, the last: the function's own log lines come before it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
