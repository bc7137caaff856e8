"""Domain errors. Each maps to one webhook status and one queue outcome in a single table (see webhook.py)."""

from __future__ import annotations

from typing import Any


class ConfigurationError(Exception):
    """The function's configuration is invalid; names every bad variable at once."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
        super().__init__(f"invalid configuration: {detail}")


MAX_ERRORS = 50  # field errors kept (and answered) per event: a hostile body must not make a 400 KB item
MAX_ERROR_TEXT = 300  # characters of a path or a message


class InvalidEvent(Exception):
    """The body is not an interact event. `errors` lists `{path, message}` pairs: at most MAX_ERRORS of them (then one
    saying how many more), each path and message cut to MAX_ERROR_TEXT characters."""

    status = 400
    detail = "the body is not a valid interact event"
    event_id: str | None = None  # the eventId its rejection is kept under, when `read_event` raised it

    def __init__(
        self,
        errors: list[dict[str, str]],
        *,
        title: str = "Invalid event",
        total: int | None = None,
        detail: str | None = None,
    ) -> None:
        # `total`: how many there are when `errors` holds only the first ones (the rest never built)
        if detail:
            self.detail = detail
        total = max(total or 0, len(errors))
        kept = [{k: str(v)[:MAX_ERROR_TEXT] for k, v in e.items()} for e in errors[:MAX_ERRORS]]
        if total > MAX_ERRORS:
            kept.append({"path": "$", "message": f"and {total - MAX_ERRORS} more errors"})
        self.errors = kept
        self.title = title
        super().__init__(title)


class PayloadTooLarge(InvalidEvent):
    """Over Edge's limit: the body as received, or (`as_sent`) the request as the relay would send it, which may be
    larger (the `_id` and timestamp it fills in, numbers written out)."""

    status = 413

    def __init__(self, size: int, limit: int, *, as_sent: bool = False) -> None:
        if as_sent:
            message = (
                "as sent to Edge (compact JSON, with the xdm._id and timestamp the relay fills in, numbers such as 1e5 "
                f"written out as 100000.0) the request is {size} bytes: over Edge's {limit}-byte limit"
            )
        else:
            message = (
                f"body is {size} bytes; the limit is {limit} bytes (Edge's own limit), counted on the body as "
                "received: compact UTF-8 JSON (no indentation, no \\u escapes for other scripts) is smaller"
            )
        super().__init__([{"path": "$", "message": message}], title="Payload too large")
        self.detail = (
            "the request is too large for Edge as the relay sends it; make the event smaller"
            if as_sent
            else f"the body is over Edge's {limit}-byte limit; make the event smaller, or send it as compact JSON"
        )


class EventIdReused(InvalidEvent):
    """The eventId of an event already finished, on an event for another identity or datastream: not a repeat of it.
    Answering it with the finished event's result would hand one person's ECID and state to another's session."""

    status = 422
    detail = "this eventId was already used for a different event; give every event its own xdm._id"

    def __init__(self) -> None:
        message = "already the eventId of an event relayed for another identity or datastream; not sent to Edge"
        super().__init__([{"path": "event.xdm._id", "message": message}], title="Event id already used")


class Unauthorized(Exception):
    """Webhook signature missing, wrong or outside the timestamp tolerance. The reason is logged, never returned."""


class CredentialsError(Exception):
    """Adobe credentials could not be read or were refused by IMS (a configuration problem, retried later)."""


class EdgeRejected(Exception):
    """Edge answered with a status that must not be retried (non-recoverable 4xx, or 500)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"edge rejected the event with {status}")


class EdgeUnavailable(Exception):
    """Edge kept failing with recoverable errors until the retry budget ran out."""

    def __init__(self, reason: str, *, retry_after: float | None = None, attempts: int = 0) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.attempts = attempts
        super().__init__(reason)


class StoreUnavailable(Exception):
    """DynamoDB could not take a write after botocore's retries."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        self.code = code  # DynamoDB's error code, when it answered with one
        super().__init__(reason)
