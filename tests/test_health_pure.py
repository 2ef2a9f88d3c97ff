"""The health throttles' decisions without a database: samples in, wait-or-go and its reason out."""

from __future__ import annotations

import itertools
import random
from decimal import Decimal

import pytest

from backfill_api.model import LimitsSpec
from backfill_api.status import ThrottleReason
from backfill_worker.throttles import health
from backfill_worker.throttles.health import Decision, ServerSample, WalMark, decide, interpret, wal_wait
from backfill_worker.throttles.health_probe import observed


def limits(**fields: object) -> LimitsSpec:
    return LimitsSpec.model_validate(fields)


@pytest.mark.parametrize("rows,expected", [
    ([(True,)], True), ([(False,)], False), ([(3,)], 3.0), ([(2.5, "ignored")], 2.5), ([(Decimal("7.25"),)], 7.25),
    ([(0,), (1,)], 0.0),  # the first row decides
])
def test_interpret_accepts_one_boolean_or_number(rows: list[tuple[object, ...]], expected: bool | float) -> None:
    value = interpret(rows)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("rows,message", [
    ([], "no row"), ([()], "without columns"), ([(None,)], "NULL"), ([("busy",)], "str ('busy')"),
    ([(float("nan"),)], "NaN"), ([([1, 2],)], "list"),
])
def test_interpret_rejects_everything_else(rows: list[tuple[object, ...]], message: str) -> None:
    with pytest.raises(health.HealthValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        interpret(rows)


def test_shape_and_verdict() -> None:
    assert health.check_shape(True, None) is None and health.check_shape(3.0, 5) is None
    assert "remove maxValue" in (health.check_shape(True, 1.0) or "")
    assert "set maxValue" in (health.check_shape(3.0, None) or "")
    assert health.query_unhealthy(True, None) and not health.query_unhealthy(False, None)
    assert health.query_unhealthy(5.5, 5) and not health.query_unhealthy(5.0, 5)  # "exceeds": strictly above
    assert not health.query_unhealthy(-1.0, 0)


def test_wal_wait_is_the_time_the_written_bytes_are_owed() -> None:
    mark = WalMark(at=10.0, wal_bytes=1_000)
    assert wal_wait(None, 5_000, 11.0, 1_000) == 0.0  # no mark yet: go (and take one)
    assert wal_wait(mark, 5_000, 11.0, 0) == 0.0  # unbounded
    assert wal_wait(mark, 3_000, 11.0, 1_000) == pytest.approx(1.0)  # 2000 B at 1000 B/s: 2 s, 1 s elapsed
    assert wal_wait(mark, 2_000, 11.0, 1_000) == 0.0  # exactly on the bound
    assert wal_wait(mark, 500, 11.0, 1_000) == 0.0  # the position cannot go back: 0 written


@pytest.mark.parametrize("backends,lock_waits,max_backends,max_waits,reason", [
    (5, 0, 4, 0, ThrottleReason.ACTIVE_BACKENDS),
    (4, 0, 4, 0, None),  # at the bound: go
    (0, 3, 0, 2, ThrottleReason.LOCK_WAITS),
    (9, 9, 0, 0, None),  # 0 disables both
    (5, 3, 4, 2, ThrottleReason.ACTIVE_BACKENDS),  # both: backends first
])
def test_thresholds(backends: int, lock_waits: int, max_backends: int, max_waits: int, reason: ThrottleReason | None) -> None:
    spec = limits(maxActiveBackends=max_backends, maxLockWaits=max_waits)
    decision = decide(spec, unhealthy=False, sample=ServerSample(1.0, None, backends, lock_waits), mark=None)
    assert (decision.wait.reason if decision.wait else None) == reason
    if decision.wait:
        assert decision.wait.seconds == health.POLL_SECONDS


def test_exhaustive_precedence_and_mark_rules() -> None:
    """Every combination of the four signals: the first failing one (query, backends, lock waits,
    WAL) is the reason; the WAL mark moves exactly when the backfill goes on with the WAL bound set."""
    mark = WalMark(0.0, 0)
    for unhealthy, busy, waiting, wal_over, wal_on in itertools.product([False, True], repeat=5):
        spec = limits(maxActiveBackends=2, maxLockWaits=1, maxWalBytesPerSecond=1000 if wal_on else 0)
        sample = ServerSample(1.0, 5_000 if wal_over else 500, 3 if busy else 1, 2 if waiting else 0)
        decision = decide(spec, unhealthy=unhealthy, sample=sample, mark=mark, query_poll_seconds=0.25)
        expected = (
            ThrottleReason.HEALTH_QUERY if unhealthy else ThrottleReason.ACTIVE_BACKENDS if busy
            else ThrottleReason.LOCK_WAITS if waiting else ThrottleReason.WAL_RATE if wal_over and wal_on else None
        )
        assert (decision.wait.reason if decision.wait else None) == expected, (unhealthy, busy, waiting, wal_over, wal_on)
        if expected is ThrottleReason.HEALTH_QUERY:
            assert decision.wait is not None and decision.wait.seconds == 0.25
        if expected is ThrottleReason.WAL_RATE:
            assert decision.wait is not None and decision.wait.seconds == health.POLL_SECONDS  # 4 s owed, re-checked each second
        moved = decision.wait is None and wal_on
        assert decision.mark == (WalMark(1.0, sample.wal_bytes or 0) if moved else mark)


def test_no_server_bound_means_no_sample_needed() -> None:
    assert decide(limits(), unhealthy=False, sample=None, mark=None) == Decision(None, None)
    assert not health.enabled(limits()) and not health.server_sample_needed(limits(health={"query": "select true"}))
    assert health.enabled(limits(health={"query": "select true"}))
    assert health.first_reason(limits(maxLockWaits=1)) is ThrottleReason.LOCK_WAITS
    assert health.first_reason(limits(maxWalBytesPerSecond=1, maxLockWaits=1)) is ThrottleReason.WAL_RATE


def test_tiny_wal_debts_are_not_waited_for() -> None:
    spec = limits(maxWalBytesPerSecond=1_000_000)
    decision = decide(spec, unhealthy=False, sample=ServerSample(1.0, 1_005_000, 0, 0), mark=WalMark(0.0, 0))
    assert decision.wait is None  # 5 ms owed: below MIN_WAL_WAIT_SECONDS


def test_simulated_run_keeps_the_wal_rate_under_the_bound() -> None:
    """A simulated backfill writing random WAL per batch plus an application writing steadily:
    pacing with ``decide`` keeps the WAL rate between marks, and over the run, within the bound."""
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    bound, app_rate = 2_000_000, 300_000  # bytes per second
    spec = limits(maxWalBytesPerSecond=bound)
    now, wal, mark = 0.0, 0, None
    marks: list[WalMark] = []
    for _ in range(300):
        batch_seconds = rng.uniform(0.02, 0.3)
        wal += int(rng.uniform(50_000, 2_000_000) + app_rate * batch_seconds)
        now += batch_seconds
        while True:
            decision = decide(spec, unhealthy=False, sample=ServerSample(now, wal, 0, 0), mark=mark)
            mark = decision.mark
            if decision.wait is None:
                break
            now += decision.wait.seconds
            wal += int(app_rate * decision.wait.seconds)
        assert mark is not None
        marks.append(mark)
    for first, second in itertools.pairwise(marks):
        if second.at > first.at:
            seconds = second.at - first.at
            # At most MIN_WAL_WAIT_SECONDS of debt is left unpaid per mark.
            assert second.wal_bytes - first.wal_bytes <= bound * (seconds + health.MIN_WAL_WAIT_SECONDS) + 1, (first, second)
    overall = (marks[-1].wal_bytes - marks[0].wal_bytes) / (marks[-1].at - marks[0].at)
    assert bound * 0.5 < overall <= bound * 1.01  # bounded, and not needlessly slow


def test_observed_event_reports_the_rate_between_looks() -> None:
    first, second = ServerSample(1.0, 1_000, 2, 0), ServerSample(3.0, 5_000, 4, 1)
    event = observed("ns/x", 0, second, first, True)
    assert event.wal_bytes_per_second == 2_000 and event.active_backends == 4 and event.lock_waits == 1
    assert event.query_value == 1.0
    none = observed("ns/x", 0, None, None, None)
    assert (none.wal_bytes_per_second, none.active_backends, none.lock_waits, none.query_value) == (None, None, None, None)


@pytest.mark.parametrize("fields,location", [
    ({"maxWalBytesPerSecond": -1}, "maxWalBytesPerSecond"),
    ({"maxActiveBackends": -2}, "maxActiveBackends"),
    ({"maxLockWaits": -3}, "maxLockWaits"),
    ({"health": {"query": "  "}}, "health.query"),
    ({"health": {"query": "select true", "timeout": "0s"}}, "health.timeout"),
    ({"health": {"query": "select true", "interval": "0"}}, "health.interval"),
    ({"health": {"query": "select true", "interval": "2m"}}, "health.interval"),
    ({"health": {}}, "health.query"),
])
def test_bad_bounds_are_refused_by_the_model(fields: dict[str, object], location: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        LimitsSpec.model_validate(fields)
    assert [".".join(str(p) for p in e["loc"]) for e in caught.value.errors()] == [location]
