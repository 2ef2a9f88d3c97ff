"""The ``backfill`` CLI: exit codes, output, and no secret in anything it prints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document, write_manifest
from typer.testing import CliRunner

from backfill_cli.app import app

runner = CliRunner()
BACKFILL = str(Path(sys.executable).parent / "backfill")


def manifest(tmp_path: Path, name: str = "cli", **spec: Any) -> str:
    return str(write_manifest(tmp_path, backfill_document(name, "t", **spec), f"{name}.yaml"))


def password_of(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["password"])


@pytest.fixture
def table(database: str) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, flag bool NOT NULL)")
        conn.execute("INSERT INTO t (id, flag) SELECT i, i % 2 = 0 FROM generate_series(1, 500) i")
    return database


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def test_run_status_reset_round_trip(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "v + 1"}, where="flag", batch={"size": 50, "minSize": 10})
    result = invoke("run", path, "--dsn", table)
    assert result.exit_code == 0, result.output
    assert "state=done rows_updated=250" in result.output
    assert password_of(table) not in result.output
    with psycopg.connect(table, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE v = 1").fetchone() == (250,)
    status = invoke("status", path, env={"BACKFILL_DSN": table})
    assert status.exit_code == 0 and "done" in status.output and "250" in status.output
    reset = invoke("reset", path, "--dsn", table)
    assert reset.exit_code == 0 and "removed 1 checkpoint row" in reset.output
    assert "no checkpoint" in invoke("status", path, "--dsn", table).output


def test_json_progress_lines(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "1"}, batch={"size": 100, "maxSize": 100, "minSize": 100})
    result = invoke("run", path, "--dsn", table, "--json-progress")
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished" and kinds.count("BatchCommitted") == 5
    assert records[-1]["percent"] == 100 and records[-1]["state"] == "done"


def test_invalid_manifest_exits_2_naming_the_field(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "1"}, batch={"sise": 10})
    result = invoke("run", path, "--dsn", table)
    assert result.exit_code == 2
    assert "spec.batch.sise" in result.output


def test_validation_failure_exits_2_and_changes_nothing(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"nosuch": "1"})
    result = invoke("run", path, "--dsn", table)
    assert result.exit_code == 2
    assert "spec.set.nosuch" in result.output and password_of(table) not in result.output


def test_missing_dsn_exits_2(table: str, tmp_path: Path) -> None:
    result = invoke("run", manifest(tmp_path, table="t", set={"v": "1"}), env={"BACKFILL_DSN": ""})
    assert result.exit_code == 2 and "BACKFILL_DSN" in result.output


def test_connection_failure_exits_4_without_the_password(tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55word"
    dsn = f"postgresql://app:{secret}@127.0.0.1:1/shop"
    result = invoke("run", manifest(tmp_path, table="t", set={"v": "1"}), "--dsn", dsn)
    assert result.exit_code == 4
    assert "app@127.0.0.1:1/shop" in result.output
    assert secret not in result.output


def test_wrong_password_exits_4_without_the_password(table: str, tmp_path: Path) -> None:
    dsn = table.replace(password_of(table), "Wrong-Pw-123")
    result = invoke("plan", manifest(tmp_path, table="t", set={"v": "1"}), "--dsn", dsn)
    assert result.exit_code == 4
    assert "Wrong-Pw-123" not in result.output and "authentication failed" in result.output


def test_already_running_exits_3(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "1"})
    with psycopg.connect(table, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('backfill:t/cli'), 0)")
        result = invoke("run", path, "--dsn", table)
    assert result.exit_code == 3 and "already being run" in result.output
    with psycopg.connect(table, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE v = 1").fetchone() == (0,)


def test_plan_prints_sql_and_index_check(table: str, tmp_path: Path) -> None:
    with psycopg.connect(table, autocommit=True) as conn:
        conn.execute("INSERT INTO t (id, flag) SELECT i, i % 2 = 0 FROM generate_series(501, 20000) i")
        conn.execute("VACUUM ANALYZE t")
    result = invoke("plan", manifest(tmp_path, table="t", set={"v": "1"}, where="flag", batch={"size": 500}), "--dsn", table)
    assert result.exit_code == 0, result.output
    assert 'UPDATE "public"."t" SET "v" = (' in result.output
    assert "t_pkey" in result.output and "plan_ok=true" in result.output and "NOT USING" not in result.output
    assert "sample batch (rolled back)" in result.output
    with psycopg.connect(table, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE v = 1").fetchone() == (0,)


def test_sigterm_pauses_and_rerun_finishes(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "v + 1"}, batch={"size": 10, "minSize": 10, "maxSize": 10, "pause": "20ms"})
    env = {**os.environ, "BACKFILL_DSN": table}
    proc = subprocess.Popen([BACKFILL, "run", path, "--json-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"BatchCommitted"' in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    finished = json.loads(stdout.strip().splitlines()[-1])
    assert finished["event"] == "RunFinished" and finished["state"] == "paused"
    assert password_of(table) not in stdout + stderr
    with psycopg.connect(table, autocommit=True) as conn:
        changed = conn.execute("SELECT count(*) FROM t WHERE v = 1").fetchone()[0]  # type: ignore[index]
    assert 0 < changed < 500 and changed == finished["rows_updated"]
    rerun = subprocess.run([BACKFILL, "run", path], capture_output=True, text=True, env=env, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    with psycopg.connect(table, autocommit=True) as conn:
        assert conn.execute("SELECT min(v), max(v) FROM t").fetchone() == (1, 1)


def test_demo_small() -> None:
    result = subprocess.run([BACKFILL, "demo", "--rows", "3000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout.replace("\n", " ")
    match = re.search(r"verification: ([\d,]+) rows now 'inactive' \(expected ([\d,]+)\), 0 still matching: OK", text)
    assert match and match.group(1) == match.group(2) and 1400 < int(match.group(1).replace(",", "")) < 1600, text


def test_run_with_dry_run_plans_and_changes_nothing(table: str, tmp_path: Path) -> None:
    result = invoke("run", manifest(tmp_path, table="t", set={"v": "1"}, dryRun=True), "--dsn", table)
    assert result.exit_code == 0, result.output
    assert "spec.dryRun is true" in result.output and "sample batch (rolled back)" in result.output
    with psycopg.connect(table, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM t WHERE v = 1").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass('backfill.checkpoints')").fetchone() == (None,)


def test_parallel_at_least_once_run_keeps_every_shard_in_the_state_file(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "1"}, parallelism=3, checkpoint={"mode": "atLeastOnce"},
                    batch={"size": 10, "minSize": 10, "maxSize": 10})
    result = invoke("run", path, "--dsn", table, "--state-dir", str(tmp_path / "state"))
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "state" / "t__cli.json").read_text())
    assert sorted(saved) == ["0", "1", "2"] and all(s["state"] == "done" for s in saved.values())
    assert sum(s["rows_updated"] for s in saved.values()) == 500
    status = invoke("status", path, "--dsn", table, "--state-dir", str(tmp_path / "state"))
    assert status.exit_code == 0 and len(re.findall(r"│ +done +│", status.output)) == 3


# -- what a new user tripped over --------------------------------------------------------------


def test_resumed_run_rate_counts_only_this_runs_rows() -> None:
    from backfill_cli.app import summary_line
    from backfill_worker.run.engine import RunReport, ShardReport

    report = RunReport((ShardReport(0, "done", 1_000, 10, 0, 2.0),), duration=2.0)
    line = summary_line(report, rows_before=800)
    assert "rows_updated=1000 rows_this_run=200" in line and line.endswith("rows_per_second=100")
    assert summary_line(report).endswith("rows_per_second=500")


def test_a_resumed_run_reports_what_earlier_runs_did(table: str, tmp_path: Path) -> None:
    from backfill_api.manifest import load_backfill
    from backfill_worker.observe.events import BatchCommitted, Event, StaticControl
    from backfill_worker.run.engine import run_backfill

    path = manifest(tmp_path, table="t", set={"v": "v + 1"}, batch={"size": 100, "maxSize": 100, "minSize": 100})
    control = StaticControl()

    def stop_after_two_batches(event: Event) -> None:
        if isinstance(event, BatchCommitted) and event.total_batches == 2:
            control.request_stop("test")

    first = run_backfill(load_backfill(path), table, listeners=[stop_after_two_batches], control=control)
    assert first.state == "paused" and first.rows_updated == 200
    result = invoke("run", path, "--dsn", table)
    assert result.exit_code == 0, result.output
    assert "rows_updated=500 rows_this_run=300" in result.output
    assert "resumed: 200 rows were already updated by earlier runs" in result.output


def test_help_shows_no_type_after_flags() -> None:
    for args in (["--help"], ["run", "--help"], ["worker", "--help"]):
        result = runner.invoke(app, args, terminal_width=80)
        assert result.exit_code == 0 and "<bool>" not in result.output, result.output
        assert "--help" in result.output


def test_plan_says_where_its_row_estimate_comes_from() -> None:
    from backfill_cli.app import estimate_lines
    from backfill_worker.plan.planner import Plan, Sample

    plan = Plan("t/p", "public.t", ("id",), ("int",), "t_pkey", 10_000, 123, 1, {}, (), Sample(100, 100, 25, 0.01), 1.0)
    lines = estimate_lines(plan)
    assert "an estimate" in lines[0]
    assert "~2,500 by the sample batch's ratio (25 of its 100 keys matched" in lines[1]
    assert "query planner's guess: ~123" in lines[2] and "ANALYZE" in lines[2]


def test_tables_are_not_cut_at_80_columns_off_a_terminal(table: str, tmp_path: Path) -> None:
    path = manifest(tmp_path, table="t", set={"v": "v + 1"}, where="flag", batch={"size": 50, "minSize": 10})
    assert invoke("run", path, "--dsn", table).exit_code == 0
    result = invoke("status", path, "--dsn", table)  # CliRunner is no terminal: rich assumes 80 columns
    row = next(line for line in result.output.splitlines() if re.match(r"\s*0\s", line))
    assert re.search(r"\(start, 500\]\s*│\s*\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row), result.output
