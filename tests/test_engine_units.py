"""Unit tests of the engine's pure parts: SQL builders, batch sizing, throttles, progress, retry, plan checks."""

from __future__ import annotations

import psycopg
import pytest
from manifests import backfill_document

from backfill_api.status import format_eta
from backfill_worker.checkpoints.checkpoint import JsonFileStore, ShardCheckpoint
from backfill_worker.observe.events import BatchCommitted, RunFinished, RunStarted, Throttled
from backfill_worker.observe.run_progress import RunProgress, eta_seconds, percent
from backfill_worker.plan.planner import Sample, projected_seconds, uses_key_index
from backfill_worker.sql import statements
from backfill_worker.sql.retry import backoff_seconds, classify
from backfill_worker.sql.statements import Style, Target
from backfill_worker.throttles.batching import MAX_GROWTH, BatchSizer
from backfill_worker.throttles.throttle import (
    MAX_ROWS_PER_SECOND,
    PAUSE,
    REPLICATION_LAG,
    after_batch,
    lag_wait,
    per_runner_rate,
)

TARGET = Target("public", "customers", ("id",), "customers_pkey", (("status", "'inactive'"),), "email LIKE '%@x'")
COMPOSITE = Target("s", "We;ird", ("tenant", "id"), "pk", (("a", "1"),), None)


def text(statement: psycopg.sql.Composable) -> str:
    # Rendering needs no connection for identifiers and plain SQL.
    return statement.as_string(None)


def test_update_batch_is_one_range_update_with_wrapped_fragments() -> None:
    rendered = text(statements.update_batch(TARGET, has_lower=True))
    assert rendered == (
        'UPDATE "public"."customers" SET "status" = (\n\'inactive\'\n) '
        'WHERE "id" > %s AND "id" <= %s AND (\nemail LIKE \'%%@x\'\n)'
    )
    assert " IN " not in rendered


def test_first_batch_has_no_lower_bound_and_dollar_style_keeps_percent() -> None:
    rendered = text(statements.update_batch(TARGET, has_lower=False, style=Style.DOLLAR))
    assert rendered.endswith('WHERE "id" <= $1 AND (\nemail LIKE \'%@x\'\n)')


def test_composite_key_uses_row_comparison_and_quoted_identifiers() -> None:
    rendered = text(statements.probe_upper_bound(COMPOSITE, has_lower=True))
    assert rendered == (
        'SELECT "tenant"::text, "id"::text FROM "s"."We;ird" WHERE ("tenant", "id") > (%s, %s) '
        'AND ("tenant", "id") <= (%s, %s) ORDER BY "s"."We;ird"."tenant", "s"."We;ird"."id" LIMIT 1 OFFSET %s'
    )
    assert statements.range_params(("1", "2"), ("3", "4")) == ["1", "2", "3", "4"]
    assert statements.range_params(None, ("3", "4")) == ["3", "4"]


def test_sizer_grows_bounded_and_converges_to_target() -> None:
    sizer = BatchSizer(size=1000, min_size=100, max_size=100_000, target_seconds=0.1)
    sizer = sizer.observe(1000, 0.001)  # 100x faster than target
    assert sizer.size == int(1000 * MAX_GROWTH)
    for _ in range(40):
        sizer = sizer.observe(sizer.size, sizer.size * 1e-5)  # 10 us per key -> 10,000 keys per 100 ms
    assert 9000 <= sizer.size <= 10_000


def test_sizer_shrinks_at_once_after_a_slow_batch_and_clamps() -> None:
    sizer = BatchSizer(size=10_000, min_size=100, max_size=100_000, target_seconds=0.1, seconds_per_key=1e-5)
    slow = sizer.observe(10_000, 1.0)  # 10x the target
    assert slow.size == 1000
    assert BatchSizer(200, 100, 1000, 0.1).observe(200, 100.0).size == 100
    assert BatchSizer(200, 100, 1000, 0.1).halve().size == 100
    assert BatchSizer(5000, 100, 50_000, 0.1).halve().size == 2500


def test_sizer_fixed_when_target_is_zero_and_partial_batches_do_not_grow() -> None:
    fixed = BatchSizer(500, 100, 1000, 0.0)
    assert fixed.observe(500, 0.000001).size == 500
    sizer = BatchSizer(1000, 100, 100_000, 0.1)
    assert sizer.observe(10, 0.000001).size == 1000  # a short tail batch says nothing about bigger ones


def test_sizer_retune() -> None:
    sizer = BatchSizer(1000, 100, 5000, 0.1)
    assert sizer.retune(min_size=100, max_size=800, target_seconds=0.1).size == 800
    assert sizer.retune(min_size=100, max_size=5000, target_seconds=0, size=300).size == 300


def test_throttle_decisions() -> None:
    assert after_batch(1000, 0.01, 0.0, 0.0) is None
    assert after_batch(1000, 0.01, 0.5, 0.0) == after_batch(1000, 0.01, 0.5, 0.0)
    wait = after_batch(1000, 0.01, 0.0, 1000.0)
    assert wait is not None and wait.reason == MAX_ROWS_PER_SECOND and wait.seconds == pytest.approx(0.99)
    paused = after_batch(10, 0.01, 0.5, 1000.0)
    assert paused is not None and paused.reason == PAUSE and paused.seconds == 0.5
    assert per_runner_rate(1000, 4) == 250
    assert per_runner_rate(0, 4) == 0
    assert lag_wait(None, 10) is None
    assert lag_wait(5.0, 10) is None
    assert lag_wait(50.0, 0) is None
    lag = lag_wait(50.0, 10)
    assert lag is not None and lag.reason == REPLICATION_LAG


def test_progress_math() -> None:
    assert percent(50, 100, False) == 50
    assert percent(150, 100, False) == 99
    assert percent(0, 0, True) == 100
    assert eta_seconds(50, 100, 10.0) == 5.0
    assert eta_seconds(50, 100, 0.0) is None
    assert format_eta(90) == "1m30s"
    assert format_eta(3700) == "1h1m40s"  # one format_eta: the status's (a duration like the spec's)
    assert format_eta(None) == ""


def test_run_progress_aggregates_events() -> None:
    progress = RunProgress()
    progress.apply(RunStarted("ns/a", 0, 2, False, 0, 1000, 0), 0.0)
    progress.apply(RunStarted("ns/a", 1, 2, True, 40, 1000, 500), 0.0)
    batch = BatchCommitted("ns/a", 0, 1, 100, 200, 200, 300, 0.01, ("200",), 100, 1)
    progress.apply(batch, 1.0)
    progress.apply(Throttled("ns/a", 1, "pause", 0.5), 1.0)
    assert progress.rows_updated == 140
    assert progress.keys_done == 700
    assert progress.percent == 35
    assert progress.throttle_reason == "pause"
    assert progress.rows_per_second == pytest.approx(100.0)
    progress.apply(RunFinished("ns/a", 0, "done", 100, 1, 0), 2.0)
    progress.apply(RunFinished("ns/a", 1, "done", 40, 0, 0), 2.0)
    assert progress.percent == 100
    assert progress.rows_per_second == pytest.approx(50.0)  # finished: 100 rows over this run's 2 s


def test_retry_classification() -> None:
    assert classify(psycopg.errors.LockNotAvailable()).kind == "lockTimeout"  # type: ignore[union-attr]
    assert classify(psycopg.errors.QueryCanceled()).timeout  # type: ignore[union-attr]
    assert classify(psycopg.errors.DeadlockDetected()).kind == "deadlock"  # type: ignore[union-attr]
    assert classify(psycopg.errors.SerializationFailure()).kind == "serialization"  # type: ignore[union-attr]
    assert classify(psycopg.errors.AdminShutdown()).reconnect  # type: ignore[union-attr]
    assert classify(psycopg.OperationalError("server closed the connection")).reconnect  # type: ignore[union-attr]
    assert classify(psycopg.errors.UniqueViolation()) is None
    assert classify(ValueError()) is None
    delays = [backoff_seconds(n) for n in range(1, 6)]
    assert delays == sorted(delays) and delays[0] < 0.5 and backoff_seconds(50) <= 10.2


def test_plan_json_index_check() -> None:
    index_only = [{"Plan": {"Node Type": "Limit", "Plans": [
        {"Node Type": "Index Only Scan", "Relation Name": "customers", "Index Name": "customers_pkey"}]}}]
    bitmap = [{"Plan": {"Node Type": "ModifyTable", "Relation Name": "customers", "Plans": [
        {"Node Type": "Bitmap Heap Scan", "Relation Name": "customers", "Plans": [
            {"Node Type": "Bitmap Index Scan", "Index Name": "customers_pkey"}]}]}}]
    seq = [{"Plan": {"Node Type": "ModifyTable", "Relation Name": "customers", "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "customers"}]}}]
    other_index = [{"Plan": {"Node Type": "Index Scan", "Relation Name": "customers", "Index Name": "by_email"}}]
    assert uses_key_index(index_only, "customers", "customers_pkey")
    assert uses_key_index(bitmap, "customers", "customers_pkey")
    assert not uses_key_index(seq, "customers", "customers_pkey")
    assert not uses_key_index(other_index, "customers", "customers_pkey")
    assert projected_seconds(10_000, Sample(1000, 1000, 500, 0.02), 0.0, 2) == pytest.approx(0.1)
    assert projected_seconds(10_000, None, 0.0, 1) is None


def test_json_store_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = JsonFileStore(tmp_path, "ns/name")
    assert store.load(0) is None
    cp = ShardCheckpoint("ns/name", 0, 2, "f", None, ("10", "a"), estimated_keys=5).after_batch(("3", "b"), 2, 3, False)
    store.save(0, cp)
    store.save(1, ShardCheckpoint("ns/name", 1, 2, "f", ("10", "a"), ("20", "z")))
    loaded = store.load(0)
    assert loaded == cp and loaded.resume_after == ("3", "b")
    assert store.clear() == 2 and store.load(0) is None


def test_prefetched_bound_is_used_only_for_its_range_and_a_similar_size() -> None:
    from backfill_worker.sql.prefetch import Bound, usable

    bound = Bound(("100",), 1000, ("1100",))
    assert usable(bound, ("100",), 1000)
    assert usable(bound, ("100",), 1400)  # adaptive growth may lag one batch
    assert not usable(bound, ("100",), 3000)  # a live re-tuning may not
    assert not usable(bound, ("100",), 500)  # nor a shrink after a slow batch
    assert not usable(bound, ("99",), 1000)  # another range (e.g. the batch failed and is retried)
    assert not usable(Bound(None, 10, None), ("1",), 10)


def test_shard_selection() -> None:
    from backfill_api.errors import ValidationFailed
    from backfill_api.manifest import parse_backfill
    from backfill_worker.run.engine import _shard_numbers

    backfill = parse_backfill(backfill_document("x", table="t", set={"v": "1"}, parallelism=3))
    assert _shard_numbers(backfill, None) == [0, 1, 2]
    assert _shard_numbers(backfill, [2, 2, 0]) == [2, 0]
    for bad in ([], [3], [-1]):
        with pytest.raises(ValidationFailed) as caught:
            _shard_numbers(backfill, bad)
        assert caught.value.field == "shard"
