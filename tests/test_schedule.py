"""Run windows (``spec.schedule``) as a pure function of a fake clock: midnight crossing, several
windows, weekdays, daylight-saving transitions, and the wait the pacer takes outside a window."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from backfill_api.model import BackfillSpec, ScheduleSpec
from backfill_api.status import ThrottleReason
from backfill_worker.throttles.schedule import HEARTBEAT_SECONDS, window_state, window_wait

BERLIN = ZoneInfo("Europe/Berlin")


def schedule(*windows: dict[str, object], zone: str = "Europe/Berlin") -> ScheduleSpec:
    return ScheduleSpec.model_validate({"timeZone": zone, "windows": list(windows)})


def local(year: int, month: int, day: int, hour: int, minute: int = 0, zone: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold)


NIGHTS = schedule({"days": ["mon", "tue", "wed", "thu", "fri"], "start": "22:00", "end": "06:00"})


# 2026-03-02 is a Monday.
@pytest.mark.parametrize("moment,inside", [
    (local(2026, 3, 2, 21, 59), False),
    (local(2026, 3, 2, 22, 0), True),     # opens on the minute
    (local(2026, 3, 3, 0, 30), True),     # Monday's window, after midnight (Tuesday)
    (local(2026, 3, 3, 5, 59), True),
    (local(2026, 3, 3, 6, 0), False),     # closes on the minute (end is exclusive)
    (local(2026, 3, 6, 23, 0), True),     # Friday night
    (local(2026, 3, 7, 3, 0), True),      # ... into Saturday morning
    (local(2026, 3, 7, 23, 0), False),    # no window opens on Saturday
    (local(2026, 3, 8, 23, 0), False),    # nor Sunday
    (local(2026, 3, 2, 3, 0), False),     # Monday early: Sunday's window does not exist
])
def test_window_crossing_midnight(moment: datetime, inside: bool) -> None:
    assert window_state(NIGHTS, moment).inside is inside


def test_next_start_and_close_times() -> None:
    outside = window_state(NIGHTS, local(2026, 3, 7, 12, 0))  # Saturday noon
    assert not outside.inside and outside.closes_at is None
    assert outside.next_start == local(2026, 3, 9, 22, 0).astimezone(UTC)  # Monday night
    inside = window_state(NIGHTS, local(2026, 3, 3, 1, 0))
    assert inside.inside and inside.next_start is None
    assert inside.closes_at == local(2026, 3, 3, 6, 0).astimezone(UTC)


def test_several_windows_overlapping_and_touching_merge() -> None:
    spec = schedule(
        {"start": "08:00", "end": "10:00"}, {"start": "09:00", "end": "12:00"},  # overlap
        {"start": "12:00", "end": "13:00"},  # touches the previous one
        {"start": "20:00", "end": "21:00"},
    )
    state = window_state(spec, local(2026, 6, 1, 8, 30))
    assert state.inside and state.closes_at == local(2026, 6, 1, 13, 0).astimezone(UTC)
    gap = window_state(spec, local(2026, 6, 1, 15, 0))
    assert not gap.inside and gap.next_start == local(2026, 6, 1, 20, 0).astimezone(UTC)
    late = window_state(spec, local(2026, 6, 1, 21, 30))
    assert late.next_start == local(2026, 6, 2, 8, 0).astimezone(UTC)


def test_whole_day_window_and_every_day_default() -> None:
    always = schedule({"start": "00:00", "end": "00:00"})
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for _ in range(500):
        moment = start + timedelta(seconds=rng.randrange(366 * 24 * 3600))
        state = window_state(always, moment)
        assert state.inside, moment
        assert state.closes_at is not None and state.closes_at > moment + timedelta(days=6)  # days chain together


def test_spring_forward_night_is_an_hour_shorter() -> None:
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST.
    spec = schedule({"days": ["sat"], "start": "22:00", "end": "06:00"})
    opened = window_state(spec, local(2026, 3, 28, 23, 0))
    assert opened.inside and opened.closes_at is not None
    assert opened.closes_at - local(2026, 3, 28, 22, 0).astimezone(UTC) == timedelta(hours=7)
    assert window_state(spec, local(2026, 3, 29, 3, 30)).inside  # just after the gap
    assert not window_state(spec, local(2026, 3, 29, 6, 0)).inside


def test_fall_back_night_is_an_hour_longer_and_the_repeated_hour_is_inside() -> None:
    # Europe/Berlin: 2026-10-25 03:00 CEST -> 02:00 CET; 02:30 happens twice.
    spec = schedule({"days": ["sat"], "start": "22:00", "end": "06:00"})
    state = window_state(spec, local(2026, 10, 24, 22, 30))
    assert state.closes_at is not None
    assert state.closes_at - local(2026, 10, 24, 22, 0).astimezone(UTC) == timedelta(hours=9)
    for fold in (0, 1):
        assert window_state(spec, local(2026, 10, 25, 2, 30, fold=fold)).inside


def test_window_starting_in_the_skipped_hour_opens_after_the_gap() -> None:
    spec = schedule({"days": ["sun"], "start": "02:30", "end": "04:00"})
    before = window_state(spec, local(2026, 3, 29, 1, 0))
    # 02:30 does not exist that night: read with the winter offset, i.e. 03:30 CEST.
    assert before.next_start == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert not window_state(spec, local(2026, 3, 29, 3, 15)).inside
    assert window_state(spec, local(2026, 3, 29, 3, 45)).inside


def test_window_ending_in_the_skipped_hour() -> None:
    spec = schedule({"days": ["sun"], "start": "01:00", "end": "02:30"})
    state = window_state(spec, local(2026, 3, 29, 1, 15))
    assert state.inside and state.closes_at == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST


def test_other_zones_and_utc() -> None:
    ny = schedule({"days": ["mon"], "start": "09:00", "end": "17:00"}, zone="America/New_York")
    assert window_state(ny, datetime(2026, 3, 2, 15, 0, tzinfo=UTC)).inside  # 10:00 EST
    assert not window_state(ny, datetime(2026, 3, 2, 13, 0, tzinfo=UTC)).inside  # 08:00 EST
    utc = schedule({"start": "10:00:30", "end": "10:00:45"}, zone="UTC")
    assert window_state(utc, datetime(2026, 3, 2, 10, 0, 40, tzinfo=UTC)).inside
    assert window_state(utc, datetime(2026, 3, 2, 10, 0, 10, tzinfo=UTC)).next_start == datetime(2026, 3, 2, 10, 0, 30, tzinfo=UTC)


def test_no_schedule_is_always_inside_and_naive_clocks_are_refused() -> None:
    assert window_state(None, datetime(2026, 1, 1, tzinfo=UTC)).inside
    with pytest.raises(ValueError, match="timezone-aware"):
        window_state(NIGHTS, datetime(2026, 1, 1))


def test_the_wait_outside_a_window_is_capped_by_the_heartbeat() -> None:
    now = local(2026, 3, 7, 12, 0)
    state = window_state(NIGHTS, now)
    wait = window_wait(state, now)
    assert wait is not None and wait.reason == ThrottleReason.WINDOW and wait.seconds == HEARTBEAT_SECONDS
    assert state.next_start is not None
    soon = state.next_start - timedelta(seconds=7)
    wait = window_wait(window_state(NIGHTS, soon), soon)
    assert wait is not None and wait.seconds == pytest.approx(7.0)
    inside = local(2026, 3, 3, 1, 0)
    assert window_wait(window_state(NIGHTS, inside), inside) is None


@pytest.mark.parametrize("bad,field,message", [
    ({"timeZone": "Mars/Olympus", "windows": [{"start": "22:00", "end": "06:00"}]}, "schedule.timeZone", "unknown time zone"),
    ({"timeZone": "../etc/passwd", "windows": [{"start": "22:00", "end": "06:00"}]}, "schedule.timeZone", "unknown time zone"),
    ({"windows": [{"start": "24:00", "end": "06:00"}]}, "schedule.windows.0.start", "hours 00-23"),
    ({"windows": [{"start": "22:00", "end": "6am"}]}, "schedule.windows.0.end", "pattern"),
    ({"windows": [{"days": [], "start": "22:00", "end": "06:00"}]}, "schedule.windows.0.days", "at least 1"),
    ({"windows": [{"days": ["mon", "mon"], "start": "22:00", "end": "06:00"}]}, "schedule.windows.0.days", "distinct"),
    ({"windows": [{"days": ["monday"], "start": "22:00", "end": "06:00"}]}, "schedule.windows.0.days.0", "'mon'"),
    ({"windows": []}, "schedule.windows", "at least 1"),
])
def test_bad_schedules_name_the_field(bad: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BackfillSpec.model_validate({"table": "t", "set": {"a": "1"}, "schedule": bad})
    errors = caught.value.errors()
    assert [".".join(str(p) for p in e["loc"]) for e in errors] == [field]
    assert message in str(caught.value)
