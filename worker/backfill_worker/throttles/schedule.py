"""Run windows (``spec.schedule``): is ``now`` inside one, and when does the next open or close (PURE).

Windows are local wall-clock times in the schedule's zone, turned into UTC intervals per day, so
a window over a daylight-saving change lasts what the clock says (``22:00``-``06:00`` is 9 hours
on the autumn night, 7 on the spring one). A local time that does not exist (skipped by the
spring change) is read with the offset before the change, i.e. as the hour after the gap; one
that exists twice (autumn) is its first occurrence (``fold=0``). Overlapping or touching windows
count as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from backfill_api.model import ScheduleSpec, WindowSpec
from backfill_api.status import ThrottleReason
from backfill_api.timezones import WEEKDAYS, load_zone
from backfill_worker.throttles.throttle import Wait

HEARTBEAT_SECONDS = 30.0
"""Longest single wait outside a window: each one is reported (the status shows the worker is
alive, so the operator does not take the wait for a stuck worker) and re-reads the live spec."""
_LOOKBACK_DAYS = 1
"""A window opened yesterday may still be open (it crosses midnight)."""
_LOOKAHEAD_DAYS = 8
"""Every weekly window opens within a week."""


@dataclass(frozen=True)
class WindowState:
    inside: bool
    next_start: datetime | None
    """Outside: when the next window opens (UTC)."""
    closes_at: datetime | None
    """Inside: when the open window (with any it overlaps) closes (UTC)."""


def occurrences(window: WindowSpec, zone_name: str, day: date) -> tuple[datetime, datetime] | None:
    """The window's ``[start, end)`` in UTC when it opens on local ``day``, else None."""
    if WEEKDAYS[day.weekday()] not in window.days:
        return None
    zone = load_zone(zone_name)
    start_time, end_time = window.start_time, window.end_time
    start = datetime.combine(day, start_time, tzinfo=zone)
    end_day = day if end_time > start_time else day + timedelta(days=1)
    end = datetime.combine(end_day, end_time, tzinfo=zone)
    # Through UTC: wall-clock arithmetic inside one zone ignores the offset change.
    start_utc, end_utc = start.astimezone(UTC), end.astimezone(UTC)
    return (start_utc, end_utc) if end_utc > start_utc else None


def intervals(schedule: ScheduleSpec, now: datetime) -> list[tuple[datetime, datetime]]:
    """Every window occurrence from yesterday to a week ahead (local dates), merged, sorted."""
    today = now.astimezone(load_zone(schedule.time_zone)).date()
    found = [
        interval
        for offset in range(-_LOOKBACK_DAYS, _LOOKAHEAD_DAYS + 1)
        for window in schedule.windows
        if (interval := occurrences(window, schedule.time_zone, today + timedelta(days=offset))) is not None
    ]
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def window_state(schedule: ScheduleSpec | None, now: datetime) -> WindowState:
    """Inside a window (and when it closes), or outside (and when the next opens). No schedule: inside."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if schedule is None:
        return WindowState(True, None, None)
    spans = intervals(schedule, now)
    for start, end in spans:
        if start <= now < end:
            return WindowState(True, None, end)
    upcoming = [start for start, _ in spans if start > now]
    return WindowState(False, min(upcoming) if upcoming else None, None)


def window_wait(state: WindowState, now: datetime) -> Wait | None:
    """The wait before the next batch: none inside a window, else until it opens (in heartbeats)."""
    if state.inside:
        return None
    until = (state.next_start - now).total_seconds() if state.next_start is not None else HEARTBEAT_SECONDS
    return Wait(ThrottleReason.WINDOW, max(0.0, min(until, HEARTBEAT_SECONDS)))
