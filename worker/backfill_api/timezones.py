"""The vocabulary of ``spec.schedule``: weekday names, ``HH:MM`` clock times, IANA time zones.

Time zones come from the standard library's ``zoneinfo`` (the system tz database, or the
``tzdata`` package where the system has none).
"""

from __future__ import annotations

from datetime import time
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = get_args(Weekday)
"""In ``datetime.weekday()`` order: ``WEEKDAYS[d.weekday()]`` is the name of ``d``'s day."""


CLOCK_PATTERN = r"^\d{2}:\d{2}(:\d{2})?$"


def parse_clock(text: str) -> time:
    """``"22:00"`` -> 22:00 (``"22:00:30"`` too); raises ValueError naming the accepted form."""
    parts = text.split(":")
    if not (len(parts) in (2, 3) and all(len(part) == 2 and part.isdigit() for part in parts)):
        raise ValueError(f"{text!r} is not a time of day: use HH:MM (24 h), e.g. '22:00'")
    hours, minutes, seconds = (int(part) for part in [*parts, "00"][:3])
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"{text!r} is not a time of day: hours 00-23, minutes and seconds 00-59")
    return time(hours, minutes, seconds)


def load_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; raises ValueError with the fix when it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin', 'America/New_York' or 'UTC'"
        ) from None
