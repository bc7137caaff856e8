"""Time, injectable so retry waits and expiries are tested without sleeping."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...  # wall clock, epoch seconds

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


@dataclass(frozen=True)
class Moment:
    """A moment read on both clocks. Time since it has passed once either clock says so: the wall clock may step, and
    whether the monotonic clock moves while Lambda freezes an environment is not documented (a pause or a hold of
    seconds must not last for days of idle invocations)."""

    mono: float
    wall: float

    @classmethod
    def of(cls, clock: Clock) -> Moment:
        return cls(clock.monotonic(), clock.now())

    def within(self, seconds: float, now: Moment) -> bool:
        """Whether less than `seconds` have passed from this moment to `now`, by both clocks."""
        return now.mono - self.mono < seconds and now.wall - self.wall < seconds


class Deadline:
    """A point on the monotonic clock after which no new work may start."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock = clock
        self.at = clock.monotonic() + max(seconds, 0.0)

    def remaining(self) -> float:
        return max(self.at - self.clock.monotonic(), 0.0)

    def left(self) -> float:
        """The time to the deadline, below 0 once it has passed (by how much)."""
        return self.at - self.clock.monotonic()

    def http_timeouts(self, connect_s: float, read_s: float) -> tuple[float, float]:
        """(connect, read) timeouts for one HTTP attempt that together fit in the time left. Connect gets at most a
        quarter of it: a pooled keep-alive connection needs no connect time, and a new one rarely needs a quarter."""
        remaining = self.remaining()
        connect = min(connect_s, remaining / 4)
        return connect, min(read_s, remaining - connect)

    def earlier(self, seconds: float) -> Deadline:
        """A deadline that is this one, or `seconds` from now if that comes first."""
        return Deadline(self.clock, min(seconds, self.remaining()))
