"""Every example is a valid Backfill (model and CRD schema) and does its job on a real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import psycopg
import pytest
import yaml

from backfill_api.manifest import load_backfill
from backfill_api.model import Backfill, ScheduleSpec, WindowSpec
from backfill_worker.plan.planner import plan_backfill
from backfill_worker.run.engine import run_backfill
from backfill_worker.throttles.schedule import window_state

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CRD = ROOT / "crds" / "backfill.dev_backfills.yaml"
FOLDERS = sorted(p.parent.name for p in EXAMPLES.glob("*/backfill.yaml"))
REQUIRED = {"customers-inactive", "uuid-keyed", "composite-key", "production-throttled", "django",
            "purge-old-events", "copy-to-archive", "backfill-from-join", "maintenance-window", "python-handler"}


def crd_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    # OpenAPI v3 schemas are a Draft 4 dialect; x-kubernetes-* keywords are ignored here.
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def test_the_promised_examples_exist_with_their_table_and_check():
    assert set(FOLDERS) >= REQUIRED
    index = (EXAMPLES / "README.md").read_text()
    for folder in FOLDERS:
        for name in ("backfill.yaml", "schema.sql", "verify.sql"):
            assert (EXAMPLES / folder / name).is_file(), f"examples/{folder}/{name} is missing"
        assert f"]({folder}/)" in index, f"examples/README.md does not list {folder}"
    assert (EXAMPLES / "django" / "README.md").is_file()


@pytest.mark.parametrize("folder", FOLDERS)
def test_example_satisfies_the_model_and_the_crd_schema(folder: str):
    path = EXAMPLES / folder / "backfill.yaml"
    backfill = load_backfill(path)
    assert backfill.spec.database.dsn_secret_ref is not None, "in-cluster examples name their Secret"
    (document,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    errors = sorted(crd_validator().iter_errors(document), key=str)
    assert not errors, "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


@pytest.mark.parametrize("folder", FOLDERS)
def test_example_runs_to_a_verified_result(folder: str, database: str, monkeypatch: pytest.MonkeyPatch):
    """The manifest exactly as shipped (throttles included), against its sample table."""
    directory = EXAMPLES / folder
    monkeypatch.syspath_prepend(str(directory))  # a spec.handler's module lives beside its manifest
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(directory.joinpath("schema.sql").read_text())
        conn.execute("ANALYZE")
    assert scalar(database, directory.joinpath("verify.sql").read_text()) > 0, "verify.sql must see the rows to fix"
    backfill = open_now(load_backfill(directory / "backfill.yaml"))

    plan = plan_backfill(backfill, database)
    assert plan.index_ok, f"{folder}: batch statements do not use the key index"

    report = run_backfill(backfill, database)
    assert report.state == "done"
    assert report.rows_updated > 0
    if backfill.spec.where:
        assert report.remaining_matches == 0
    assert scalar(database, directory.joinpath("verify.sql").read_text()) == 0
    # A rerun finds its checkpoint done and changes nothing more.
    again = run_backfill(backfill, database)
    assert again.state == "done" and scalar(database, directory.joinpath("verify.sql").read_text()) == 0


def open_now(backfill: Backfill) -> Backfill:
    """The manifest with its run windows (if any) replaced by one open now, in the same zone."""
    schedule = backfill.spec.schedule
    if schedule is None:
        return backfill
    now = datetime.now(ZoneInfo(schedule.time_zone))
    window = WindowSpec(start=(now - timedelta(minutes=1)).strftime("%H:%M:%S"),
                        end=(now + timedelta(minutes=30)).strftime("%H:%M:%S"))
    spec = backfill.spec.model_copy(update={"schedule": ScheduleSpec(time_zone=schedule.time_zone, windows=[window])})
    return backfill.model_copy(update={"spec": spec})


def test_maintenance_window_example_runs_nights_and_weekends_only():
    schedule = load_backfill(EXAMPLES / "maintenance-window" / "backfill.yaml").spec.schedule
    berlin = ZoneInfo("Europe/Berlin")
    tuesday_noon = datetime(2026, 12, 1, 12, 0, tzinfo=berlin)
    state = window_state(schedule, tuesday_noon)
    assert not state.inside and state.next_start == datetime(2026, 12, 1, 22, 0, tzinfo=berlin).astimezone(UTC)
    assert window_state(schedule, datetime(2026, 12, 2, 5, 0, tzinfo=berlin)).inside  # Tuesday night, after midnight
    saturday = window_state(schedule, datetime(2026, 12, 5, 15, 0, tzinfo=berlin))
    # Friday night runs into the weekend, and the weekend into Monday 00:00.
    assert saturday.inside and saturday.closes_at == datetime(2026, 12, 7, 0, 0, tzinfo=berlin).astimezone(UTC)
