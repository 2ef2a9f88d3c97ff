"""Identifiers folded as PostgreSQL folds them, and a failed run's checkpoint says ``failed`` and why
(issue 10, item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from backfill_api.errors import BackfillError
from backfill_api.identifiers import parse_qualified_name
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill
from backfill_cli.app import app
from backfill_worker.run.engine import read_checkpoints, run_backfill


def make(**spec: Any) -> Backfill:
    return parse_backfill(
        {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": "f", "namespace": "t"}, "spec": spec}
    )


@pytest.mark.parametrize(
    ("text", "schema", "name"),
    [("ÄB", None, "Äb"), ("Σχήμα.TÄBLE", "Σχήμα", "tÄble"), ("İX", None, "İx"), ("ǅ.ﬀA", "ǅ", "ﬀa")],
)
def test_only_ascii_letters_are_folded(text: str, schema: str | None, name: str) -> None:
    parsed = parse_qualified_name(text)
    assert (parsed.schema, parsed.name) == (schema, name)


def test_folding_agrees_with_the_server(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE ÄBC (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")  # unquoted: the server folds
        conn.execute("INSERT INTO ÄBC (id) SELECT generate_series(1, 10)")
        server_name = conn.execute("SELECT relname FROM pg_class WHERE relname ILIKE '%bc'").fetchone()[0]  # type: ignore[index]
    assert parse_qualified_name("ÄBC").name == server_name
    assert run_backfill(make(table="ÄBC", set={"v": "1"}), database).state == "done"


def test_a_failed_run_leaves_state_failed_with_the_reason(database: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, d int NOT NULL, v int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO t (id, d) SELECT i, CASE WHEN i = 150 THEN 0 ELSE 1 END FROM generate_series(1, 300) i")
    spec = {"table": "t", "set": {"v": "10 / d"}, "batch": {"size": 50, "minSize": 10, "maxSize": 50, "targetDuration": "0"}}
    with pytest.raises(BackfillError, match="division by zero"):
        run_backfill(make(**spec), database)
    [cp] = read_checkpoints(make(**spec), database)
    assert cp.state == "failed" and cp.last_key == ("100",)
    assert cp.last_error is not None and "division by zero" in cp.last_error
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
                                    "metadata": {"name": "f", "namespace": "t"}, "spec": spec}))
    shown = CliRunner().invoke(app, ["status", str(path), "--dsn", database])
    assert "failed" in shown.output and "division by zero" in " ".join(shown.output.split()), shown.output
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("UPDATE t SET d = 1")
    assert run_backfill(make(**spec), database).state == "done"  # the fix, then a rerun resumes after key 100
    [cp] = read_checkpoints(make(**spec), database)
    assert cp.state == "done" and cp.last_error is None
