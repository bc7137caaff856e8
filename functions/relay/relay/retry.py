"""Which Edge answers are recoverable, and how long to wait before the next try (reference §3)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Adobe: retry 429, 502, 503, 504 (and 408, which the mobile cores treat as recoverable); never 500 or other 4xx.
RECOVERABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
MAX_RETRY_AFTER_S = 3600.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds: an integer number of seconds or an HTTP-date. None when absent, unreadable, or not
    in the future: Adobe's mobile SDKs use it only when it is above 0 (reference §3.4), so a 0 or a past date gets the
    backoff, not retries back to back."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a year or hour past any datetime
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.fromtimestamp(now, tz=UTC)).total_seconds()
    return min(seconds, MAX_RETRY_AFTER_S) if seconds > 0 else None


def backoff(attempt: int, *, base: float = 0.2, cap: float = 5.0, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal" jitter (between half the ceiling and the ceiling, so a retry never comes at
    once); `attempt` counts from 1."""
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return (rng or random).uniform(ceiling / 2, ceiling)
