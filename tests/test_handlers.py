"""Python handlers (``spec.handler``) against a real PostgreSQL: the batch API, exactly-once with
non-idempotent code, typed bounds, shards, retries, failures, and the transaction guard."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from manifests import backfill_document
from pydantic import ValidationError

from backfill_api.errors import BackfillError, ValidationFailed
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill, HandlerSpec
from backfill_worker.changes import handlers
from backfill_worker.observe.events import BatchCommitted, RetryScheduled
from backfill_worker.run.engine import read_checkpoints, run_backfill


@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Write a handler module under a fresh name; returns ``write(source) -> 'module'``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"handlers_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def make(callable_: str, **spec: Any) -> Backfill:
    body: dict[str, Any] = {"table": "people", "handler": {"callable": callable_}}
    body.update(spec)
    return parse_backfill(backfill_document("h", "t", **body))


def small(size: int = 10) -> dict[str, Any]:
    return {"size": size, "minSize": 1, "maxSize": size, "targetDuration": "0"}


def run_sql(dsn: str, *commands: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        result: list[tuple[Any, ...]] = []
        for command in commands:
            cursor = conn.execute(command)
            result = cursor.fetchall() if cursor.description else []
        return result


PEOPLE = """
CREATE TABLE people (id int PRIMARY KEY, email text NOT NULL, normalized boolean NOT NULL DEFAULT false);
INSERT INTO people (id, email) SELECT g, ' User' || g || '@Example.COM ' FROM generate_series(1, 95) g;
CREATE TABLE audit (person int NOT NULL, at_batch int NOT NULL);
"""

# Non-idempotent: every call appends audit rows, so a batch run twice would show.
NORMALIZE = """
    def normalize(batch):
        rows = list(batch.rows())
        with batch.connection.cursor() as cur:
            cur.executemany(
                "UPDATE people SET email = %s, normalized = true WHERE id = %s",
                [(row["email"].strip().lower(), row["id"]) for row in rows],
            )
            cur.executemany("INSERT INTO audit VALUES (%s, %s)", [(row["id"], batch.shard) for row in rows])
"""


def test_plain_handler_changes_each_row_once_and_counts_what_rows_yielded(database: str, handler_module: Any) -> None:
    run_sql(database, PEOPLE, "UPDATE people SET normalized = true WHERE id % 10 = 0")
    module = handler_module(NORMALIZE)
    events: list[Any] = []
    report = run_backfill(make(f"{module}:normalize", where="NOT normalized", batch=small()), database, listeners=[events.append])
    assert report.state == "done"
    assert report.remaining_matches == 0
    changed = 95 - 9
    assert report.rows_updated == changed
    assert run_sql(database, "SELECT count(*), count(DISTINCT person) FROM audit") == [(changed, changed)]
    assert run_sql(database, "SELECT count(*) FROM people WHERE email <> lower(trim(email))") == [(9,)]  # the skipped ones
    assert sum(e.rows_updated for e in events if isinstance(e, BatchCommitted)) == changed
    # A second run finds the checkpoint done: the non-idempotent handler is not called again.
    again = run_backfill(make(f"{module}:normalize", where="NOT normalized", batch=small()), database)
    assert again.rows_updated == changed
    assert run_sql(database, "SELECT count(*) FROM audit") == [(changed,)]


def test_batch_bounds_are_typed_key_values_and_cover_every_key_once(database: str, handler_module: Any) -> None:
    run_sql(
        database,
        "CREATE TABLE people (tenant int, name text, seen int NOT NULL DEFAULT 0, PRIMARY KEY (tenant, name))",
        "INSERT INTO people SELECT g % 3, 'n' || g, 0 FROM generate_series(1, 40) g",
        "CREATE TABLE bounds (lower_tenant int, lower_name text, upper_tenant int, upper_name text, types text, shard int)",
    )
    module = handler_module("""
        def record(batch):
            lower = batch.lower or (None, None)
            types = ",".join(type(v).__name__ for v in batch.upper)
            batch.connection.execute("INSERT INTO bounds VALUES (%s, %s, %s, %s, %s, %s)", [*lower, *batch.upper, types, batch.shard])
            pred, params = batch.predicate()
            from psycopg import sql
            cur = batch.connection.execute(sql.SQL("UPDATE {} SET seen = seen + 1 WHERE {}").format(batch.table_identifier, pred), params)
            return cur.rowcount
    """)
    report = run_backfill(make(f"{module}:record", batch=small(7), parallelism=2), database)
    assert report.state == "done" and report.rows_updated == 40
    assert run_sql(database, "SELECT DISTINCT types FROM bounds") == [("int,str",)]
    assert run_sql(database, "SELECT array_agg(DISTINCT shard ORDER BY shard) FROM bounds") == [([0, 1],)]
    assert run_sql(database, "SELECT min(seen), max(seen) FROM people") == [(1, 1)]
    assert report.remaining_matches is None  # no where: nothing to verify


def test_a_handler_that_raises_rolls_its_batch_back_and_names_its_line(database: str, handler_module: Any) -> None:
    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE + """
    def failing(batch):
        normalize(batch)
        if batch.lower is not None and batch.lower[0] >= 30:
            raise ValueError(f"cannot parse the address of {batch.lower[0]} (dsn {batch.connection.info.dsn})")
    """)
    backfill = make(f"{module}:failing", where="NOT normalized", batch=small())
    with pytest.raises(BackfillError) as caught:
        run_backfill(backfill, database)
    message = str(caught.value)
    assert message.startswith(f"spec.handler: {module}:failing raised ValueError: cannot parse the address of 30")
    assert f"{module}.py:" in message and "in failing" in message
    assert "nothing of it was committed" in message
    assert "canary" not in message  # the DSN in the message is redacted (the suite's password)
    # Exactly the three batches before it committed, with their audit rows; nothing of the fourth.
    assert run_sql(database, "SELECT count(*), max(person) FROM audit") == [(30, 30)]
    assert run_sql(database, "SELECT count(*) FROM people WHERE normalized") == [(30,)]
    (checkpoint,) = read_checkpoints(backfill, database)
    assert checkpoint.state == "failed" and checkpoint.rows_updated == 30
    assert checkpoint.last_error is not None and "ValueError" in checkpoint.last_error


@pytest.mark.parametrize(
    "ending",
    [
        "batch.connection.commit()",
        "batch.connection.execute('COMMIT')",
        "batch.connection.rollback()",
        "batch.connection.execute('ROLLBACK')",
        "batch.connection.execute('COMMIT; BEGIN')",
    ],
)
def test_a_handler_that_ends_the_transaction_is_refused_with_nothing_committed(
    database: str, handler_module: Any, ending: str
) -> None:
    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE + f"""
    def sneaky(batch):
        normalize(batch)
        try:
            {ending}
        except Exception:
            pass  # swallowed: the engine must notice anyway
        batch.connection.execute("INSERT INTO audit VALUES (-1, -1)")  # after the end: a new, implicit transaction
    """)
    backfill = make(f"{module}:sneaky", where="NOT normalized", batch=small())
    with pytest.raises(BackfillError, match="committed or rolled back the batch transaction itself") as caught:
        run_backfill(backfill, database)
    assert "spec.handler" in str(caught.value) and "nothing of the batch was committed" in str(caught.value)
    assert run_sql(database, "SELECT count(*) FROM audit") == [(0,)]
    assert run_sql(database, "SELECT count(*) FROM people WHERE normalized") == [(0,)]
    (checkpoint,) = read_checkpoints(backfill, database)
    assert checkpoint.rows_updated == 0 and checkpoint.last_key is None


def test_switching_autocommit_on_inside_the_batch_is_refused(database: str, handler_module: Any) -> None:
    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE + """
    def autocommit(batch):
        normalize(batch)
        batch.connection.autocommit = True
    """)
    with pytest.raises(BackfillError, match=r"spec.handler: .*ProgrammingError: can't change 'autocommit' now"):
        run_backfill(make(f"{module}:autocommit", batch=small()), database)
    assert run_sql(database, "SELECT count(*) FROM audit") == [(0,)]


def test_transient_errors_in_the_handler_retry_with_a_halved_batch(database: str, handler_module: Any) -> None:
    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE + """
    STATE = {"slept": False}
    def slow_once(batch):
        if not STATE["slept"]:  # the first attempt of the first batch outlives statementTimeout
            STATE["slept"] = True
            batch.connection.execute("SELECT pg_sleep(0.5)")
        normalize(batch)
    """)
    events: list[Any] = []
    report = run_backfill(
        make(f"{module}:slow_once", where="NOT normalized", batch=small(40), limits={"statementTimeout": "100ms", "maxRetries": 5}),
        database, listeners=[events.append],
    )
    retries = [e for e in events if isinstance(e, RetryScheduled)]
    assert retries and retries[0].error_kind == "statementTimeout" and retries[0].next_batch_size == 20
    assert report.state == "done" and report.rows_updated == 95
    assert run_sql(database, "SELECT count(*), count(DISTINCT person) FROM audit") == [(95, 95)]


@pytest.mark.parametrize(
    "returned,expected",
    [("'many'", "returned str 'many'"), ("True", "returned bool True"), ("-1", "returned int -1")],
)
def test_a_handler_must_return_a_row_count_or_none(database: str, handler_module: Any, returned: str, expected: str) -> None:
    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE + f"""
    def wrong(batch):
        normalize(batch)
        return {returned}
    """)
    with pytest.raises(BackfillError, match=f"spec.handler: {module}:wrong {expected}"):
        run_backfill(make(f"{module}:wrong", batch=small()), database)
    assert run_sql(database, "SELECT count(*) FROM audit") == [(0,)]


# -- loading: before any connection ----------------------------------------------------------


def load(callable_: str) -> handlers.Handler:
    return handlers.load(HandlerSpec(callable=callable_))


def test_load_refuses_what_cannot_be_a_handler(handler_module: Any) -> None:
    module = handler_module("""
        import json
        CONSTANT = 3
        def two(batch, other): ...
        def none(): ...
        def keyword_only(batch, *, mode): ...
        async def coro(batch): ...
        def fine(batch, *, verbose=False): return 0
        class Holder:
            @staticmethod
            def method(batch): return 0
    """)
    cases = {
        "no_such_module_x:f": "cannot import module 'no_such_module_x': no module named 'no_such_module_x'",
        f"{module}:missing": f"{module!r} has no attribute 'missing'",
        f"{module}:CONSTANT": "is a int, not a function",
        f"{module}:two": "takes 2 positional parameters (batch, other)",
        f"{module}:none": "takes 0 positional parameters (none)",
        f"{module}:keyword_only": "also requires the keyword-only parameters ['mode']",
        f"{module}:coro": "is an async function",
        f"{module}:Holder.nope": f"'{module}:Holder' has no attribute 'nope'",
    }
    for callable_, expected in cases.items():
        with pytest.raises(ValidationFailed) as caught:
            load(callable_)
        assert caught.value.field == "spec.handler.callable"
        assert expected in caught.value.message, (callable_, caught.value.message)
    assert load(f"{module}:fine") is not None
    assert load(f"{module}:Holder.method") is not None


def test_load_reports_errors_raised_while_importing_the_module(handler_module: Any) -> None:
    broken = handler_module("import json\nraise RuntimeError('settings missing: postgresql://u:secret-pw@h/db')\n")
    with pytest.raises(ValidationFailed) as caught:
        load(f"{broken}:f")
    assert "RuntimeError: settings missing" in caught.value.message and f"{broken}.py:2" in caught.value.message
    assert "secret-pw" not in caught.value.message
    inner = handler_module("import no_such_dependency_y\n")
    with pytest.raises(ValidationFailed, match="ModuleNotFoundError: No module named 'no_such_dependency_y'"):
        load(f"{inner}:f")
    syntax = handler_module("def f(batch):\n    return (\n")
    with pytest.raises(ValidationFailed, match=rf"SyntaxError: .*{syntax}.py:2"):
        load(f"{syntax}:f")


def test_the_spec_takes_exactly_one_kind_of_change() -> None:
    base = {"table": "people"}
    with pytest.raises(ValidationError, match="nothing to change: give exactly one of spec.set, spec.delete, spec.copy, spec.handler"):
        parse_backfill_model(base)
    with pytest.raises(ValidationError, match="spec.set and spec.handler are both given"):
        parse_backfill_model({**base, "set": {"a": "1"}, "handler": {"callable": "m:f"}})
    with pytest.raises(ValidationError, match="callable"):
        parse_backfill_model({**base, "handler": {"callable": "not a path"}})
    with pytest.raises(ValidationError, match="model"):
        parse_backfill_model({**base, "handler": {"callable": "m:f", "django": {"model": "NoAppLabel"}}})
    plain = Backfill.model_validate(backfill_document("a", **{**base, "handler": {"callable": "m:f"}}))
    other = Backfill.model_validate(backfill_document("a", **{**base, "handler": {"callable": "m:g"}}))
    assert plain.spec.fingerprint() != other.spec.fingerprint()


def parse_backfill_model(spec: dict[str, Any]) -> Backfill:
    return Backfill.model_validate(backfill_document("a", **spec))


def test_a_handler_that_does_not_import_writes_nothing(database: str) -> None:
    run_sql(database, PEOPLE)
    with pytest.raises(ValidationFailed, match="spec.handler.callable: cannot import module"):
        run_backfill(make("no_such_module_z:f"), database)
    assert run_sql(database, "SELECT count(*) FROM pg_namespace WHERE nspname = 'backfill'") == [(0,)]


def test_a_django_handler_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django", None)  # as if not installed: `import django` fails
    backfill = make("m:f", handler={"callable": "m:f", "django": {"model": "shop.Customer"}})
    with pytest.raises(ValidationFailed) as caught:
        handlers.runtime_for(backfill.spec, None)
    assert caught.value.field == "spec.handler.django"
    assert "pip install 'backfill-operator[django]'" in caught.value.message


def test_handler_runtimes_are_plugins_found_by_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import entry_points

    from backfill_django.runtime import DjangoRuntime

    (django,) = entry_points(group=handlers.RUNTIMES, name="django")
    assert django.load() == DjangoRuntime.from_spec
    backfill = make("m:f", handler={"callable": "m:f", "django": {"model": "shop.Customer"}})
    assert handlers.runtime_name(backfill.spec.handler) == "django"
    assert handlers.runtime_name(make("m:f").spec.handler) is None
    assert handlers.runtime_for(make("m:f").spec, None) is None
    # No plugin registered under the name: the field and the fix, before anything is written.
    monkeypatch.setattr(handlers, "RUNTIMES", "backfill_operator.no_such_group")
    with pytest.raises(ValidationFailed) as caught:
        handlers.runtime_for(backfill.spec, None)
    assert caught.value.field == "spec.handler.django"
    assert "pip install 'backfill-operator[django]'" in caught.value.message


def test_the_cli_runs_plans_and_shows_a_handler_manifest(database: str, handler_module: Any, tmp_path: Path) -> None:
    from manifests import write_manifest
    from typer.testing import CliRunner

    from backfill_cli.app import app

    run_sql(database, PEOPLE)
    module = handler_module(NORMALIZE)
    document = backfill_document("cli", "t", table="people", where="NOT normalized", handler={"callable": f"{module}:normalize"},
                                 batch=small(25))
    path = str(write_manifest(tmp_path, document))
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", path, "--dsn", database])
    assert planned.exit_code == 0, planned.output
    assert "FOR NO KEY UPDATE" in planned.output and "plan_ok=true" in planned.output
    assert run_sql(database, "SELECT count(*) FROM audit") == [(0,)]  # plan does not call the handler
    done = runner.invoke(app, ["run", path, "--dsn", database])
    assert done.exit_code == 0 and "state=done rows_updated=95 " in done.output, done.output
    status = runner.invoke(app, ["status", path, "--dsn", database])
    assert status.exit_code == 0 and "done" in status.output and "95" in status.output, status.output


def test_the_handler_change_describes_its_batch_statement_for_plan(handler_module: Any) -> None:
    from backfill_worker.changes import changes
    from backfill_worker.sql.statements import Style, Target

    module = handler_module(NORMALIZE)
    target = Target("public", "people", ("id",), "people_pkey", (), "NOT normalized", ("integer",))
    change = changes.for_spec(make(f"{module}:normalize", where="NOT normalized").spec, target, shard=1)
    assert isinstance(change, changes.PythonHandler) and change.shard == 1
    assert change.name == "rows" and change.verifiable
    text = change.statement(has_lower=True, style=Style.DOLLAR).as_string(None)
    assert text == (
        'SELECT * FROM "public"."people" WHERE "id" > $1 AND "id" <= $2 AND (\nNOT normalized\n) '
        'ORDER BY "public"."people"."id" FOR NO KEY UPDATE'
    )
    unverifiable = changes.for_spec(make(f"{module}:normalize").spec, Target("public", "people", ("id",), "people_pkey", ()))
    assert isinstance(unverifiable, changes.PythonHandler) and not unverifiable.verifiable
