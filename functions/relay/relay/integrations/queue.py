"""The retry queue: where a webhook event goes when Edge is unavailable (contract §7, 202)."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from relay import codec
from relay.models import InboundEvent


class RetryQueue:
    def __init__(self, client: Any, queue_url: str | None) -> None:
        self._sqs = client
        self._url = queue_url

    def send(self, inbound: InboundEvent, *, delay_s: float | None = None) -> bool:
        """Enqueue the prepared request (stable `xdm._id`); False when there is no queue or the send failed."""
        if not self._url:
            return False
        try:
            self._sqs.send_message(
                QueueUrl=self._url,
                MessageBody=codec.dumps(inbound.request),
                DelaySeconds=int(min(max(delay_s or 0, 0), 900)),
                MessageAttributes={
                    "datastreamId": {"DataType": "String", "StringValue": inbound.datastream_id},
                    "relaySource": {"DataType": "String", "StringValue": inbound.source},
                    "eventId": {"DataType": "String", "StringValue": inbound.event_id},
                },
            )
        except (ClientError, BotoCoreError):
            return False
        return True
