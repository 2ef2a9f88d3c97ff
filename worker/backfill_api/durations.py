"""Kubernetes-style duration strings (``500ms``, ``2s``, ``1m30s``, ``0``) <-> ``timedelta``."""

from __future__ import annotations

import re
from datetime import timedelta

# Same units as Go's time.ParseDuration minus ns/us, which make no sense for batch pacing.
DURATION_PATTERN = r"^(0|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse ``"1m30s"``-style text. Bare numbers are rejected (ambiguous unit) except 0."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text == 0:
            return timedelta(0)
        raise ValueError(f"duration {text!r} needs a unit, e.g. '{text}s' or '{text}ms'")
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string such as '500ms' or '2s', not {type(text).__name__}")
    value = text.strip()
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit ms, s, m or h, e.g. '500ms', '2s', '1m30s'"
        )
    if value == "0":
        return timedelta(0)
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(value))
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Shortest round-trippable form: ``0``, ``250ms``, ``2s``, ``1m30s``."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms == 0:
        return "0"
    if total_ms % 1000:
        return f"{total_ms}ms"
    seconds = total_ms // 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
