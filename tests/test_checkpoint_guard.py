"""No setting can make a change apply twice (issue 10, item 2).

Between two ``backfill run``s of one manifest, every field that decides where progress lives
(``spec.checkpoint.schema``, ``spec.checkpoint.mode``) or which backfill it belongs to
(``metadata.name``/``namespace``) is edited; the second run must refuse with the way out and
change nothing. (Fields of the change itself are in the spec fingerprint: CheckpointMismatch.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from typer.testing import CliRunner

from backfill_api.model import IMMUTABLE_SPEC_FIELDS, BackfillSpec
from backfill_cli.app import app
from backfill_worker.checkpoints.checkpoint_guard import CLI_GUARDS, FINGERPRINT_FIELDS

runner = CliRunner()
SPEC: dict[str, Any] = {"table": "t", "set": {"v": "v + 1"}, "batch": {"size": 40, "minSize": 10}}


def write(tmp_path: Path, name: str = "guard", namespace: str = "t", **spec: Any) -> str:
    document = {"apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
                "metadata": {"name": name, "namespace": namespace}, "spec": {**SPEC, **spec}}
    path = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def run(path: str, dsn: str, state_dir: Path) -> Any:
    return runner.invoke(app, ["run", path, "--dsn", dsn, "--state-dir", str(state_dir)], catch_exceptions=False)


def counters(dsn: str) -> list[tuple[int, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT v, count(*) FROM t GROUP BY v ORDER BY v").fetchall()


@pytest.fixture
def table(database: str) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO t (id) SELECT generate_series(1, 200)")
    return database


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ({}, {"checkpoint": {"schema": "elsewhere"}}, "a checkpoint for backfill t/guard exists in schema 'backfill'"),
        ({"checkpoint": {"schema": "one"}}, {"checkpoint": {"schema": "two"}}, "exists in schema 'one'"),
        ({}, {"checkpoint": {"mode": "atLeastOnce"}}, "exists in schema 'backfill'"),
        ({"checkpoint": {"mode": "atLeastOnce"}}, {}, "progress file"),
        ({}, {"__name": "renamed"}, "the same change"),
        ({}, {"__namespace": "other"}, "the same change"),
    ],
    ids=["schema-default-to-other", "schema-one-to-two", "mode-to-atLeastOnce", "mode-to-transactional", "name", "namespace"],
)
def test_moving_the_progress_between_runs_is_refused(
    table: str, tmp_path: Path, first: dict[str, Any], second: dict[str, Any], expected: str
) -> None:
    state_dir = tmp_path / "state"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    done = run(write(manifests, **first), table, state_dir)
    assert done.exit_code == 0, done.output
    assert counters(table) == [(1, 200)]
    second = dict(second)
    name, namespace = second.pop("__name", "guard"), second.pop("__namespace", "t")
    again = run(write(manifests, name=name, namespace=namespace, **second), table, state_dir)
    assert again.exit_code == 2, again.output
    assert expected in " ".join(again.output.split()), again.output
    assert "backfill reset" in again.output
    assert counters(table) == [(1, 200)], "the change was applied twice"


def test_the_way_out_works(table: str, tmp_path: Path) -> None:
    """Setting the schema back resumes (nothing to do); resetting the old checkpoint allows the move."""
    state_dir, manifests = tmp_path / "state", tmp_path / "m"
    manifests.mkdir()
    original = write(manifests)
    assert run(original, table, state_dir).exit_code == 0
    assert run(original, table, state_dir).exit_code == 0  # set back: resumes the done checkpoint, no change
    assert counters(table) == [(1, 200)]
    assert runner.invoke(app, ["reset", original, "--dsn", table]).exit_code == 0
    moved = run(write(manifests, checkpoint={"schema": "elsewhere"}), table, state_dir)
    assert moved.exit_code == 0, moved.output
    assert counters(table) == [(2, 200)]  # a deliberate second application, after an explicit reset


def test_every_immutable_field_is_guarded_in_the_cli() -> None:
    """The cluster's list of immutable fields (specdiff) is the list the CLI guards, field by field."""
    assert set(CLI_GUARDS) == set(IMMUTABLE_SPEC_FIELDS)
    base = BackfillSpec.model_validate(SPEC)
    edits = {"table": {"table": "u"}, "key": {"key": "id"}, "set": {"set": {"v": "2"}}, "where": {"where": "v = 0"},
             "parallelism": {"parallelism": 2},
             "delete": {"set": None, "delete": {}, "where": "v = 0"},
             "copy": {"set": None, "copy": {"table": "u", "onConflict": "doNothing"}},
             "from": {"from": [{"table": "u", "alias": "x", "condition": "x.id = t.id"}]},
             "walk": {"walk": "ctid", "where": "v = 0"},
             "handler": {"set": None, "handler": {"callable": "m:f"}}}
    assert set(edits) == set(FINGERPRINT_FIELDS)
    for field, edit in edits.items():
        assert BackfillSpec.model_validate({**SPEC, **edit}).fingerprint() != base.fingerprint(), field
    handled = BackfillSpec.model_validate({**SPEC, "set": None, "handler": {"callable": "m:f"}})
    other = BackfillSpec.model_validate({**SPEC, "set": None, "handler": {"callable": "m:f", "django": {"model": "a.B"}}})
    assert handled.fingerprint() != other.fingerprint()
