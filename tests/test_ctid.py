"""``walk: ctid``: batches over physical block ranges, for tables without a usable unique key.

A table with no unique index at all (duplicate values everywhere) gets a non-idempotent change
(``counter + 1``): afterwards every matching row is exactly one higher and no other row differs,
with one or several shards, across pause/resume, in atLeastOnce mode, and while rows move to
new blocks (fillfactor 100: every update writes its row into a block past the fixed end).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document, write_manifest
from pydantic import ValidationError
from typer.testing import CliRunner

from backfill_api.errors import BackfillError, ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill, BackfillSpec
from backfill_cli.app import app
from backfill_worker.checkpoints.checkpoint import JsonFileStore, ShardCheckpoint
from backfill_worker.observe.events import BatchCommitted, StaticControl
from backfill_worker.observe.worker_metrics import WorkerMetrics
from backfill_worker.plan.planner import plan_backfill
from backfill_worker.run.engine import read_checkpoints, run_backfill
from backfill_worker.sql import blocks

WHERE = "grp < 50 AND NOT done"
SET = {"counter": "counter + 1", "done": "true"}


def make(name: str = "ctid", **spec: Any) -> Backfill:
    body: dict[str, Any] = {"table": "logs", "walk": "ctid", "set": dict(SET), "where": WHERE,
                            "batch": {"size": 4, "minSize": 1, "maxSize": 4, "targetDuration": "0"},
                            "limits": {"applicationImpact": {"mode": "fast"}}}
    body.update(spec)
    return parse_backfill(backfill_document(name, "t", **body))


def seed(dsn: str, rows: int = 3000, fillfactor: int = 100) -> int:
    """``logs`` without any unique index (``n`` repeats), its snapshot; returns its blocks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE logs (id int NOT NULL, n int NOT NULL, grp int NOT NULL, counter int NOT NULL, "
            f"done boolean NOT NULL DEFAULT false, pad text NOT NULL) WITH (fillfactor = {fillfactor})"
        )
        conn.execute(
            "INSERT INTO logs (id, n, grp, counter, pad) SELECT g, g %% 10, (g * 7919) %% 100, g %% 7, repeat('x', 100) "
            "FROM generate_series(1, %s) g",
            [rows],
        )
        conn.execute("VACUUM ANALYZE logs")
        conn.execute("CREATE TABLE logs_snapshot AS SELECT * FROM logs")
        row = conn.execute("SELECT pg_relation_size('logs') / current_setting('block_size')::int").fetchone()
        assert row is not None
        return int(row[0])


def wrong_rows(dsn: str) -> int:
    """Rows not exactly as the backfill should leave them (matching: +1 and done; others untouched)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM logs_snapshot s FULL JOIN logs l USING (id) WHERE l.id IS NULL OR s.id IS NULL OR "
            "CASE WHEN s.grp < 50 THEN l.counter <> s.counter + 1 OR NOT l.done "
            "ELSE l.counter <> s.counter OR l.done END OR l.pad <> s.pad OR l.n <> s.n"
        ).fetchone()
        assert row is not None
        return int(row[0])


def scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


# -- pure -----------------------------------------------------------------------------------------


def test_block_ranges_are_consecutive_and_cover_the_table_once() -> None:
    assert blocks.next_upper(None, ("10",), 4) == (("4",), 4)
    assert blocks.next_upper(("8",), ("10",), 4) == (("10",), 2)
    for table_blocks in (1, 2, 7, 64, 1001):
        for shards in (1, 3, 8):
            bounds = blocks.shard_bounds(table_blocks, shards)
            assert bounds[0][0] is None and bounds[-1][1] == (str(table_blocks),)
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(shards - 1))
            assert sum(blocks.block(upper) - blocks.block(lower) for lower, upper in bounds) == table_blocks


def test_the_last_shard_verifies_past_any_block() -> None:
    first = ShardCheckpoint("t/x", 0, 2, "f", None, ("5",))
    last = ShardCheckpoint("t/x", 1, 2, "f", ("5",), ("10",))
    assert blocks.verification_upper(first) == ("5",)
    assert blocks.verification_upper(last) == (str(blocks.END_OF_ANY_TABLE),)


@pytest.mark.parametrize("version,shown", [(130011, "version 13"), (90624, "version 9.6")])
def test_servers_before_14_are_refused_naming_the_field_and_version(version: int, shown: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        blocks.check_server_version(version)
    assert refused.value.field == "spec.walk" and shown in str(refused.value) and "PostgreSQL 14" in str(refused.value)
    blocks.check_server_version(140000)
    blocks.check_server_version(170002)


def test_the_model_refuses_ctid_without_where_or_with_a_key() -> None:
    with pytest.raises(ValidationError, match="walk: ctid needs spec.where"):
        BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "set": {"v": "1"}, "batch": {"size": 10, "minSize": 1}})
    with pytest.raises(ValidationError, match="remove spec.key"):
        BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "key": "id", "set": {"v": "1"}, "where": "v <> 1"})


def test_the_model_refuses_ctid_with_the_key_batch_defaults() -> None:
    """The defaults count keys; as blocks (x ~100 rows) a first batch would be far too big."""
    with pytest.raises(ValidationError, match="counts batch sizes in blocks"):
        BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "set": {"v": "1"}, "where": "v <> 1"})
    with pytest.raises(ValidationError, match="counts batch sizes in blocks"):  # what the API server's defaulting sends
        BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "set": {"v": "1"}, "where": "v <> 1",
                                     "batch": {"size": 1000, "minSize": 100, "maxSize": 50000, "targetDuration": "200ms"}})
    BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "set": {"v": "1"}, "where": "v <> 1", "batch": {"size": 10, "minSize": 1}})


def test_the_walk_is_part_of_the_fingerprint_and_key_walks_keep_theirs() -> None:
    key = BackfillSpec.model_validate({"table": "logs", "set": {"v": "1"}, "where": "v <> 1"})
    explicit = BackfillSpec.model_validate({"table": "logs", "walk": "key", "set": {"v": "1"}, "where": "v <> 1"})
    ctid = BackfillSpec.model_validate({"table": "logs", "walk": "ctid", "set": {"v": "1"}, "where": "v <> 1", "batch": {"size": 10, "minSize": 1}})
    assert key.fingerprint() == explicit.fingerprint() != ctid.fingerprint()
    assert key.fingerprint() == "45a1d5cb98562867"  # computed before walk existed: old checkpoints still resume


# -- against PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.parametrize("parallelism,fillfactor", [(1, 100), (3, 100), (2, 50)])
def test_every_matching_row_is_changed_exactly_once(database: str, parallelism: int, fillfactor: int) -> None:
    table_blocks = seed(database, fillfactor=fillfactor)
    events: list[Any] = []
    report = run_backfill(make(parallelism=parallelism), database, listeners=[events.append])
    assert report.state == "done" and report.remaining_matches == 0
    assert report.rows_updated == scalar(database, "SELECT count(*) FROM logs_snapshot WHERE grp < 50")
    assert wrong_rows(database) == 0
    checkpoints = read_checkpoints(make(parallelism=parallelism), database)
    # The fixed end, stored in the checkpoint: the blocks at planning (the rolled-back validation
    # sample may have added a few blocks of dead row versions by then).
    fixed_end = blocks.block(checkpoints[-1].upper_key)
    assert table_blocks <= fixed_end <= table_blocks + 2 * 8
    batches = [e for e in events if isinstance(e, BatchCommitted)]
    assert sum(e.keys_scanned for e in batches) == fixed_end  # every block visited once
    assert sum(cp.keys_done for cp in checkpoints) == sum(cp.estimated_keys for cp in checkpoints) == fixed_end
    if fillfactor == 100:  # every updated row moved past the fixed end, and was not met again
        assert scalar(database, "SELECT pg_relation_size('logs') / 8192") > fixed_end


def test_pause_and_resume_continue_at_the_checkpointed_block(database: str) -> None:
    seed(database)
    backfill = make()
    control = StaticControl()

    def stop_after_three(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 3:
            control.request_stop("test")

    first = run_backfill(backfill, database, listeners=[stop_after_three], control=control)
    assert first.state == "paused" and first.batches == 3
    [cp] = read_checkpoints(backfill, database)
    assert cp.state == "paused" and cp.last_key == ("12",) and cp.keys_done == 12
    second = run_backfill(backfill, database)
    assert second.state == "done" and second.remaining_matches == 0
    assert wrong_rows(database) == 0


def test_at_least_once_mode_reapplies_nothing_because_where_is_false(database: str, tmp_path: Path) -> None:
    seed(database)
    backfill = make(checkpoint={"mode": "atLeastOnce"})
    store = JsonFileStore(tmp_path, backfill.identity)
    control = StaticControl()

    def stop_after_two(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 2:
            control.request_stop("test")

    assert run_backfill(backfill, database, control=control, listeners=[stop_after_two], at_least_once_store=store).state == "paused"
    # A crash between COMMIT and saving the progress: the store is one batch behind.
    saved = store.load(0)
    assert saved is not None and saved.last_key == ("8",)
    store.save(0, replace(saved, last_key=("4",), batches=1))
    report = run_backfill(backfill, database, at_least_once_store=store)
    assert report.state == "done" and report.remaining_matches == 0
    assert wrong_rows(database) == 0  # the redone blocks 4..7 matched nothing any more


def test_a_set_that_leaves_where_true_is_refused_before_any_write(database: str) -> None:
    seed(database)
    before = scalar(database, "SELECT sum(counter) FROM logs")
    with pytest.raises(ValidationFailed) as refused:
        run_backfill(make(set={"counter": "counter + 1"}), database)  # done stays false: where stays true
    assert refused.value.field == "spec.where" and "still match where after the change" in str(refused.value)
    assert scalar(database, "SELECT sum(counter) FROM logs") == before
    assert scalar(database, "SELECT to_regclass('backfill.checkpoints') IS NULL")  # refused before planning


def test_a_batch_whose_rows_still_match_where_is_rolled_back(database: str) -> None:
    """Past the validation sample the change stops making where false: that batch fails, uncommitted."""
    seed(database)
    past_sample = "(SELECT max(id) FROM logs WHERE ctid < '(12,0)'::tid)"
    backfill = make(set={"counter": "counter + 1", "done": f"id <= {past_sample}"})
    with pytest.raises(BackfillError, match="still match where after the change"):
        run_backfill(backfill, database)
    [cp] = read_checkpoints(backfill, database)
    assert cp.state == "failed" and cp.last_key == ("12",)  # blocks 0..11 committed, 12..15 rolled back
    assert scalar(database, "SELECT count(*) FROM logs WHERE counter <> (SELECT counter FROM logs_snapshot s "
                            "WHERE s.id = logs.id) AND ctid >= '(12,0)'::tid AND NOT done") == 0
    assert scalar(database, "SELECT count(*) FROM logs l JOIN logs_snapshot s USING (id) WHERE l.done") == scalar(
        database, "SELECT count(*) FROM logs_snapshot WHERE grp < 50 AND ctid < '(12,0)'::tid")


def test_rows_appended_after_the_start_are_not_the_backfills_but_verification_counts_them(database: str) -> None:
    seed(database)
    inserted = False

    def insert_once(event: Any) -> None:
        nonlocal inserted
        if isinstance(event, BatchCommitted) and not inserted:
            inserted = True
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("INSERT INTO logs (id, n, grp, counter, pad) VALUES (-1, 0, 1, 0, 'late')")

    report = run_backfill(make(), database, listeners=[insert_once])
    assert report.state == "done"
    assert report.remaining_matches == 1  # counted over the whole table, new blocks included
    assert scalar(database, "SELECT counter FROM logs WHERE id = -1") == 0  # past the fixed end: not changed


def test_plan_shows_tid_range_scans_and_block_estimates(database: str) -> None:
    table_blocks = seed(database)
    plan = plan_backfill(make(batch={"size": 8, "minSize": 1, "maxSize": 8}), database)
    assert plan.by_ctid and table_blocks <= plan.estimated_keys <= table_blocks + 2 * 8 and plan.index_ok
    assert {check.generic for check in plan.index_checks} == {False, True}
    for check in plan.index_checks:
        assert check.uses_index and check.scans and all(scan.startswith("Tid Range Scan") for scan in check.scans)
    assert '"ctid" >=' in plan.statements["update"] and "RETURNING" in plan.statements["update"]
    assert plan.sample is not None and plan.sample.keys == 8 and plan.sample.rows > 0
    assert wrong_rows(database) == scalar(database, "SELECT count(*) FROM logs_snapshot WHERE grp < 50")  # nothing written


def test_a_table_with_a_primary_key_can_walk_by_ctid(database: str) -> None:
    seed(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER TABLE logs ADD PRIMARY KEY (id)")
    report = run_backfill(make(parallelism=2), database)
    assert report.state == "done" and report.remaining_matches == 0 and wrong_rows(database) == 0


def test_a_partitioned_table_is_refused(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE parts (v int NOT NULL) PARTITION BY RANGE (v)")
        conn.execute("CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (100)")
    with pytest.raises(ValidationFailed) as refused:
        run_backfill(make(table="parts", set={"v": "v + 1"}, where="v < 0"), database)
    assert refused.value.field == "spec.walk" and "partition" in str(refused.value)


def test_cli_plan_status_and_metrics_speak_in_blocks(database: str, tmp_path: Path) -> None:
    seed(database)
    backfill = make(parallelism=2)
    document = backfill_document("ctid", "t", **backfill.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    manifest = write_manifest(tmp_path, document)
    cli = CliRunner()
    env = {"BACKFILL_DSN": database, "COLUMNS": "200"}
    planned = cli.invoke(app, ["plan", str(manifest)], env=env, catch_exceptions=False)
    assert planned.exit_code == 0, planned.output
    assert "walk: ctid" in planned.output and "blocks in range:" in planned.output
    assert "Tid Range Scan on logs" in planned.output and "plan_ok=true" in planned.output
    metrics = WorkerMetrics()
    report = run_backfill(backfill, database, listeners=[metrics])
    status = cli.invoke(app, ["status", str(manifest)], env=env, catch_exceptions=False)
    assert status.exit_code == 0, status.output
    assert "blocks done" in status.output and "next block" in status.output
    fixed_end = sum(cp.estimated_keys for cp in read_checkpoints(backfill, database))
    scanned = sum(
        metrics.registry.get_sample_value("backfill_keys_scanned_total", {"namespace": "t", "name": "ctid", "shard": str(s)}) or 0
        for s in (0, 1)
    )
    assert report.state == "done" and scanned == fixed_end
    assert metrics.registry.get_sample_value("backfill_progress_ratio", {"namespace": "t", "name": "ctid", "shard": "1"}) == 1.0


def test_a_row_the_application_moves_behind_the_walk_is_reported_by_the_verification(database: str) -> None:
    """The documented limit: an application UPDATE of a row the walk has not reached may put its
    new version into a block the walk has passed (free space found by VACUUM). The walk misses it;
    the verification, over the whole table, counts it."""
    seed(database)
    moved: dict[str, Any] = {}

    def application(event: Any) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 3 and not moved:
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("VACUUM logs")  # the done blocks' dead versions become free space
                row = conn.execute(
                    "UPDATE logs SET pad = pad || '!' WHERE id = (SELECT min(id) FROM logs WHERE grp < 50 AND NOT done "
                    "AND ctid >= '(30,0)'::tid AND ctid < '(31,0)'::tid) "  # a full block ahead of the walk
                    "RETURNING id, (ctid::text::point)[0]::int"
                ).fetchone()
                assert row is not None
                moved.update(id=row[0], block=row[1], walked=blocks.block(event.last_key))

    report = run_backfill(make(), database, listeners=[application])
    assert moved["block"] < moved["walked"], f"the new version did not land behind the walk: {moved}"
    assert report.state == "done" and report.remaining_matches == 1
    assert scalar(database, f"SELECT done FROM logs WHERE id = {moved['id']}") is False
