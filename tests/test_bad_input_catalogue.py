"""A catalogue of bad manifests and environments, run through the real ``backfill run`` CLI
against a real PostgreSQL. Every row: the documented exit status, a message naming the field
or cause, no traceback, no secret, and zero rows changed (checksum of every table before and
after, and no checkpoint recorded). A second table lists hostile-looking identifiers (quotes,
semicolons, dots, unicode) that must simply work.

Exit statuses (``errors.py``): 1 failed run, 2 invalid manifest or spec, 3 already running,
4 cannot connect.
"""

from __future__ import annotations

import copy
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from manifests import backfill_document
from psycopg import sql
from support_faults.secrets import CANARY_PASSWORD, assert_absent
from typer.testing import CliRunner

from backfill_cli.app import app
from backfill_cli.localpg import LocalPostgres

ROLE_PASSWORD = "role-Pw-51c0ffee"
WRONG_PASSWORD = "wrong-Pw-0badc0de"
SUFFIX = uuid.uuid4().hex[:8]
READER, READ_ONLY, NO_CREATE = f"bf_reader_{SUFFIX}", f"bf_readonly_{SUFFIX}", f"bf_nocreate_{SUFFIX}"

SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, counter int NOT NULL, note text,
                    doubled int GENERATED ALWAYS AS (counter * 2) STORED, u text UNIQUE);
INSERT INTO items (id, grp, counter, u) SELECT g, g % 10, 0, 'u' || g FROM generate_series(1, 300) g;
CREATE TABLE nopk (id int NOT NULL, v int NOT NULL DEFAULT 0);
INSERT INTO nopk (id) SELECT generate_series(1, 50);
CREATE TABLE nonunique (id int NOT NULL, v int NOT NULL DEFAULT 0);
CREATE INDEX nonunique_id ON nonunique (id);
INSERT INTO nonunique (id) SELECT g % 10 FROM generate_series(1, 50) g;
CREATE TABLE nullable_key (id int UNIQUE, v int NOT NULL DEFAULT 0);
INSERT INTO nullable_key (id) SELECT generate_series(1, 50);
CREATE TABLE partial_pk_only (id int NOT NULL, v int NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX partial_unique ON partial_pk_only (id) WHERE id > 10;
INSERT INTO partial_pk_only (id) SELECT generate_series(1, 50);
CREATE VIEW items_view AS SELECT * FROM items;
CREATE TABLE mismatch (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO mismatch (id) SELECT generate_series(1, 50);
CREATE TABLE copy_target (id bigint PRIMARY KEY, grp int NOT NULL, when_seen date);
CREATE TABLE copy_no_key (id bigint NOT NULL, grp int NOT NULL);
CREATE TABLE parted (v int NOT NULL, done boolean NOT NULL DEFAULT false) PARTITION BY RANGE (v);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
INSERT INTO parted (v) SELECT generate_series(0, 99);
"""


@dataclass(frozen=True, repr=False)
class Env:
    dsn: dict[str, str | None]
    """Named DSNs: super, reader, readonly, nocreate, wrongpw, unreachable, nodb, none."""
    secrets: list[str]

    def __repr__(self) -> str:  # failure reports show fixtures' values: never the DSNs
        return "Env(<DSNs hidden>)"

    @property
    def admin(self) -> str:
        """The superuser DSN (checksums, preparation)."""
        dsn = self.dsn["super"]
        assert dsn is not None
        return dsn


@pytest.fixture(scope="module")
def env(pg_server: LocalPostgres) -> Iterator[Env]:
    name = f"catalogue_{SUFFIX}"
    admin = pg_server.dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        for role in (READER, READ_ONLY, NO_CREATE):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(ROLE_PASSWORD)))
    dsn = pg_server.dsn(dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        reader, read_only, no_create = (sql.Identifier(r) for r in (READER, READ_ONLY, NO_CREATE))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(reader))
        conn.execute(sql.SQL("GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO {}, {}").format(read_only, no_create))
        conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(read_only))
        # The mismatch case needs an existing checkpoint of another spec (its own schema, so the
        # no-create role still finds no `backfill` schema).
        conn.execute("CREATE SCHEMA mm_checkpoints")
    free_port = _free_port()
    dsns: dict[str, str | None] = {
        "super": dsn,
        "reader": pg_server.dsn(dbname=name, user=READER, password=ROLE_PASSWORD),
        "readonly": pg_server.dsn(dbname=name, user=READ_ONLY, password=ROLE_PASSWORD),
        "nocreate": pg_server.dsn(dbname=name, user=NO_CREATE, password=ROLE_PASSWORD),
        "wrongpw": pg_server.dsn(dbname=name, password=WRONG_PASSWORD),
        "unreachable": f"postgresql://postgres:{CANARY_PASSWORD}@127.0.0.1:{free_port}/{name}",
        "nodb": pg_server.dsn(dbname=f"no_such_db_{SUFFIX}"),
        "none": None,
    }
    try:
        yield Env(dsns, [CANARY_PASSWORD, ROLE_PASSWORD, WRONG_PASSWORD, *(d for d in dsns.values() if d)])
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            for role in (READER, READ_ONLY, NO_CREATE):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def snapshot(dsn: str) -> dict[str, Any]:
    """md5 of every user table's rows (in key order) plus every checkpoint row anywhere."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        ).fetchall()
        return {
            name: conn.execute(
                sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t").format(
                    sql.SQL(name)  # from format('%I.%I'): already quoted identifiers
                )
            ).fetchone()
            for (name,) in tables
        }


def base_manifest(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"table": "items", "set": {"counter": "counter + 1"}, "where": "grp < 5"}
    body.update(spec)
    return backfill_document("catalogue", "bad", **body)


def without(document: dict[str, Any], *path: str) -> dict[str, Any]:
    target = document
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return document


@dataclass(frozen=True)
class Case:
    id: str
    expect_exit: int
    expect: tuple[str, ...]
    """Substrings the error output must contain: the field path or the cause, and the fix."""
    document: dict[str, Any] | None = None
    raw: str | None = None
    """Manifest text used verbatim (for YAML-level errors)."""
    dsn: str = "super"
    args: tuple[str, ...] = ()
    prepare: tuple[str, ...] = field(default=())
    """Extra CLI runs (as the superuser) before the case, e.g. to leave a checkpoint behind."""


M = base_manifest
BLOCKS = {"size": 4, "minSize": 1, "maxSize": 64}
"""``walk: ctid`` batch sizes (blocks): the key defaults are refused there."""
RUNTIME_CHECKPOINTS = "runtime_checkpoints"
CATALOGUE: list[Case] = [
    # -- schema violations: rejected before any connection ----------------------------------
    Case("missing-table", 2, ("spec.table", "required field is missing"), without(M(), "spec", "table")),
    Case("missing-set", 2, ("spec: nothing to change", "spec.set", "spec.handler"), without(M(), "spec", "set")),
    Case("unknown-field", 2, ("spec.batch.sise", "unknown field"), M(batch={"sise": 10})),
    Case("unknown-top-level-field", 2, ("spec.wher", "unknown field"), M(wher="grp < 5")),
    Case("batch-size-zero", 2, ("spec.batch.size", "greater than or equal to 1"), M(batch={"size": 0})),
    Case("min-over-max", 2, ("spec.batch", "minSize (500) must not exceed maxSize (100)"),
         M(batch={"minSize": 500, "maxSize": 100, "size": 100})),
    Case("bad-duration", 2, ("spec.limits.lockTimeout",), M(limits={"lockTimeout": "fast"})),
    Case("negative-rate", 2, ("spec.limits.maxRowsPerSecond",), M(limits={"maxRowsPerSecond": -5})),
    Case("empty-set", 2, ("spec.set",), M(set={})),
    Case("blank-set-expression", 2, ("spec.set", "expression for column 'counter' is empty"), M(set={"counter": "  "})),
    Case("blank-where", 2, ("spec.where", "blank"), M(where="   ")),
    Case("bad-memory-quantity", 2, ("spec.worker.resources.limits.memory", "not a Kubernetes quantity", "256Mi"),
         M(worker={"resources": {"limits": {"memory": "20MB"}}})),
    Case("unknown-resources-section", 2, ("spec.worker.resources", "unknown section 'limit'", "requests or limits"),
         M(worker={"resources": {"limit": {"memory": "256Mi"}}})),
    Case("parallelism-zero", 2, ("spec.parallelism",), M(parallelism=0)),
    Case("delete-without-where", 2, ("spec.where is required with delete", "allRows: true"), M(set=None, delete={}, where=None)),
    Case("set-and-delete-together", 2, ("spec.set and spec.delete are both given", "exactly one of spec.set, spec.delete, spec.copy, spec.handler"), M(delete={})),
    Case("copy-without-conflict-policy", 2, ("spec.copy.onConflict", "required field is missing"), M(set=None, copy={"table": "copy_target"})),
    Case("duplicate-key-columns", 2, ("spec.key", "distinct"), M(key=["id", "id"])),
    Case("table-three-parts", 2, ("spec.table", "3 parts"), M(table="a.b.c")),
    Case("wrong-api-version", 2, ("apiVersion",), {**M(), "apiVersion": "backfill.dev/v1"}),
    Case("bad-metadata-name", 2, ("metadata.name", "[a-z0-9]"), {**M(), "metadata": {"name": "Not_A_DNS_Name"}}),
    Case("yaml-syntax-error", 2, ("(yaml)",), raw="apiVersion: backfill.dev/v1alpha1\nkind: Backfill\nspec: [unclosed\n"),
    Case("not-a-mapping", 2, ("expected a YAML mapping",), raw="- just\n- a list\n"),
    Case("duplicate-where", 2, ("spec.where", "duplicate key"),
         raw="apiVersion: backfill.dev/v1alpha1\nkind: Backfill\nmetadata: {name: dup, namespace: t}\n"
             "spec:\n  table: items\n  set: {counter: counter + 1}\n  where: grp < 5\n  where: grp < 9\n"),
    Case("duplicate-set-column", 2, ("spec.set.counter", "duplicate key"),
         raw="apiVersion: backfill.dev/v1alpha1\nkind: Backfill\nmetadata: {name: dup, namespace: t}\n"
             "spec:\n  table: items\n  set:\n    counter: counter + 1\n    counter: counter + 2\n"),
    Case("where-10-megabytes", 2, ("(file)", "larger than the 3,145,728 bytes"), M(where="grp < 5 OR " * 1_000_000 + "true")),
    Case("where-1-megabyte", 2, ("spec.where", "at most 65536 characters"), M(where="grp < 5 OR " * 100_000 + "true")),
    Case("set-expression-too-long", 2, ("spec.set.counter", "at most 65536 characters"), M(set={"counter": "1" + " + 1" * 20_000})),
    # -- the spec does not fit the database --------------------------------------------------
    Case("unknown-table", 2, ("spec.table", "'no_such_table' not found"), M(table="no_such_table")),
    Case("unknown-schema", 2, ("spec.table", "not found in that schema"), M(table="nope.items")),
    # Messages quote user input verbatim: brackets must not be taken for terminal markup.
    Case("table-name-looks-like-markup", 2, ("spec.table", '"[/b]"', "not found"), M(table='"[/b]"')),
    Case("view-not-table", 2, ("spec.table", "view", "not a table"), M(table="items_view")),
    Case("unknown-set-column", 2, ("spec.set.colour", "does not exist"), M(set={"colour": "'red'"})),
    Case("unknown-key-column", 2, ("spec.key", "'nope' does not exist"), M(key=["nope"])),
    Case("set-syntax-error", 2, ("spec.set.counter", "syntax error"), M(set={"counter": "(counter + 1"})),
    Case("where-syntax-error", 2, ("spec.where", "syntax error"), M(where="grp <<< 5 AND")),
    Case("where-unknown-column", 2, ("spec.where", "column \"colour\" does not exist"), M(where="colour = 'red'")),
    Case("set-wrong-type", 2, ("spec.set.counter", "integer"), M(set={"counter": "'many'"})),
    Case("set-wrong-type-expression", 2, ("spec.set.counter",), M(set={"counter": "now()"})),
    Case("where-not-boolean", 2, ("spec.where", "boolean"), M(where="grp + 1")),
    Case("set-semicolon-injection", 2, ("spec.set.counter", '";"'), M(set={"counter": "1; DROP TABLE items"})),
    Case("where-semicolon-injection", 2, ("spec.where",), M(where="true; DELETE FROM items")),
    Case("where-escapes-parentheses", 2, ("spec.where",), M(where="grp < 5) OR (true")),
    Case("set-escapes-into-second-column", 2, ("spec.set.counter",), M(set={"counter": "1, note = 'pwned'"})),
    Case("set-key-column", 2, ("spec.set.id", "part of the key"), M(set={"id": "id + 1000"})),
    Case("set-generated-column", 2, ("spec.set.doubled", "generated column"), M(set={"doubled": "1"})),
    Case("no-primary-key", 2, ("spec.key", "no primary key"), M(table="nopk", set={"v": "1"}, where=None)),
    Case("non-unique-key", 2, ("spec.key", "no unique index covers exactly ['id']"), M(table="nonunique", key=["id"], set={"v": "1"}, where=None)),
    Case("nullable-key", 2, ("spec.key", "nullable"), M(table="nullable_key", key=["id"], set={"v": "1"}, where=None)),
    Case("partial-unique-index-key", 2, ("spec.key",), M(table="partial_pk_only", key=["id"], set={"v": "1"}, where=None)),
    Case("copy-target-missing", 2, ("spec.copy.table", "'no_such_archive' not found"),
         M(set=None, copy={"table": "no_such_archive", "onConflict": "doNothing"})),
    Case("copy-column-missing", 2, ("spec.copy.columns.colour", "does not exist in public.copy_target"),
         M(set=None, copy={"table": "copy_target", "columns": {"id": "id", "grp": "grp", "colour": "'red'"}, "onConflict": "doNothing"})),
    Case("copy-column-type-mismatch", 2, ("spec.copy.columns.when_seen", "date"),
         M(set=None, copy={"table": "copy_target", "columns": {"id": "id", "grp": "grp", "when_seen": "counter"}, "onConflict": "update"})),
    Case("copy-target-without-unique-key", 2, ("spec.copy.conflictKey", "no primary key", "unique"),
         M(set=None, copy={"table": "copy_no_key", "onConflict": "doNothing"})),
    Case("copy-conflict-key-not-unique", 2, ("spec.copy.conflictKey", "no unique index", "CREATE UNIQUE INDEX"),
         M(set=None, copy={"table": "copy_target", "conflictKey": ["grp"], "onConflict": "doNothing"})),
    Case("copy-into-itself", 2, ("spec.copy.table", "the source table itself"),
         M(set=None, copy={"table": "items", "onConflict": "doNothing"})),
    Case("from-table-missing", 2, ("spec.from[0].table", "'no_such_accounts' not found"),
         M(**{"from": [{"table": "no_such_accounts", "alias": "a", "condition": "a.id = items.id"}]})),
    # walk: ctid (block ranges; PostgreSQL < 14 is refused too: tests/test_ctid.py checks that pure rule)
    Case("ctid-without-where", 2, ("walk: ctid needs spec.where", "changed twice"), M(walk="ctid", where=None, batch=BLOCKS)),
    Case("ctid-with-key", 2, ("walk: ctid", "remove spec.key"), M(walk="ctid", key=["id"], batch=BLOCKS)),
    Case("ctid-with-key-batch-defaults", 2, ("walk: ctid counts batch sizes in blocks", "spec.batch.size"), M(walk="ctid")),
    Case("ctid-where-stays-true", 2, ("spec.where", "still match where after the change", "nothing of that batch"),
         M(walk="ctid", set={"counter": "counter + 1"}, where="grp < 5", batch=BLOCKS)),
    Case("ctid-partitioned-table", 2, ("spec.walk", "partitioned", "one backfill per partition"),
         M(walk="ctid", table="parted", set={"done": "true"}, where="NOT done", batch=BLOCKS)),
    Case("shard-out-of-range", 2, ("shard 5 does not exist", "spec.parallelism is 1"), M(), args=("--shard", "5")),
    Case("checkpoint-of-another-spec", 2, ("different spec", "backfill reset"),
         M(table="mismatch", set={"v": "v + 2"}, where=None, checkpoint={"schema": "mm_checkpoints"}),
         prepare=("mismatch-original",)),
    # -- failures at run time: the first batch fails, nothing of it is committed ------------------
    # (own checkpoint schema: a started run leaves its planned checkpoint row, with 0 rows.)
    Case("division-by-zero-in-first-batch", 1, ("division by zero", "nothing of that batch was committed"),
         M(set={"counter": "counter / (id - 1)"}, where=None, checkpoint={"schema": RUNTIME_CHECKPOINTS})),
    Case("unique-violation-in-first-batch", 1, ("duplicate key value", "nothing of that batch was committed"),
         M(set={"u": "'same'"}, where=None, checkpoint={"schema": RUNTIME_CHECKPOINTS})),
    # -- health throttles and run windows (issue 12): refused before the first write ----------------
    Case("health-query-errors", 2, ("spec.limits.health.query", "does not exist", "fix the query"),
         M(limits={"health": {"query": "SELECT busy FROM no_such_health_table"}})),
    Case("health-query-no-row", 2, ("spec.limits.health.query", "returned no row"),
         M(limits={"health": {"query": "SELECT true WHERE false"}})),
    Case("health-query-returns-text", 2, ("spec.limits.health.query", "returned a str", "boolean or a number"),
         M(limits={"health": {"query": "SELECT 'busy'::text"}})),
    Case("health-query-returns-null", 2, ("spec.limits.health.query", "returned NULL"),
         M(limits={"health": {"query": "SELECT NULL::int"}})),
    Case("health-query-not-a-query", 2, ("spec.limits.health.query", "returned no row"),
         M(limits={"health": {"query": "SET work_mem = '4MB'"}})),
    Case("health-query-too-slow", 2, ("spec.limits.health.query", "did not answer within", "raise the timeout"),
         M(limits={"health": {"query": "SELECT pg_sleep(2) IS NULL", "timeout": "100ms"}})),
    Case("health-number-without-max-value", 2, ("spec.limits.health.maxValue", "set maxValue"),
         M(limits={"health": {"query": "SELECT count(*) FROM items"}})),
    Case("health-boolean-with-max-value", 2, ("spec.limits.health.maxValue", "remove maxValue"),
         M(limits={"health": {"query": "SELECT true", "maxValue": 3}})),
    Case("health-query-blank", 2, ("spec.limits.health.query", "blank"), M(limits={"health": {"query": "  "}})),
    Case("negative-wal-bound", 2, ("spec.limits.maxWalBytesPerSecond", "greater than or equal to 0"),
         M(limits={"maxWalBytesPerSecond": -1})),
    Case("negative-active-backends", 2, ("spec.limits.maxActiveBackends",), M(limits={"maxActiveBackends": -1})),
    Case("negative-lock-waits", 2, ("spec.limits.maxLockWaits",), M(limits={"maxLockWaits": -4})),
    Case("backends-bound-without-stats-visibility", 2, ("spec.limits.maxActiveBackends", "pg_read_all_stats"),
         M(limits={"maxActiveBackends": 5}), dsn="nocreate"),
    Case("bad-time-zone", 2, ("spec.schedule.timeZone", "unknown time zone 'Europe/Atlantis'", "IANA"),
         M(schedule={"timeZone": "Europe/Atlantis", "windows": [{"start": "22:00", "end": "06:00"}]})),
    Case("window-bad-time", 2, ("spec.schedule.windows[0].start", "hours 00-23"),
         M(schedule={"windows": [{"start": "25:00", "end": "06:00"}]})),
    Case("window-empty-days", 2, ("spec.schedule.windows[0].days", "at least 1"),
         M(schedule={"windows": [{"days": [], "start": "22:00", "end": "06:00"}]})),
    Case("window-unknown-day", 2, ("spec.schedule.windows[0].days[0]", "'mon'"),
         M(schedule={"windows": [{"days": ["funday"], "start": "22:00", "end": "06:00"}]})),
    Case("schedule-without-windows", 2, ("spec.schedule.windows", "at least 1"), M(schedule={"windows": []})),
    # -- spec.handler (tests/catalogue_handlers.py): refused before any write, or its batch rolled back --
    Case("handler-and-set", 2, ("spec.set and spec.handler are both given", "exactly one"),
         M(handler={"callable": "catalogue_handlers:bump"})),
    Case("handler-callable-malformed", 2, ("spec.handler.callable", "should match pattern"),
         without(M(handler={"callable": "catalogue_handlers.bump"}), "spec", "set")),
    Case("handler-module-missing", 2, ("spec.handler.callable", "cannot import module 'no_such_handlers'", "PYTHONPATH"),
         without(M(handler={"callable": "no_such_handlers:bump"}), "spec", "set")),
    Case("handler-attribute-missing", 2, ("spec.handler.callable", "has no attribute 'bumpp'"),
         without(M(handler={"callable": "catalogue_handlers:bumpp"}), "spec", "set")),
    Case("handler-not-callable", 2, ("spec.handler.callable", "is a int, not a function"),
         without(M(handler={"callable": "catalogue_handlers:NOT_A_FUNCTION"}), "spec", "set")),
    Case("handler-wrong-signature", 2, ("spec.handler.callable", "takes 2 positional parameters (batch, other)", "def handler(batch)"),
         without(M(handler={"callable": "catalogue_handlers:two_parameters"}), "spec", "set")),
    Case("handler-async", 2, ("spec.handler.callable", "async function"),
         without(M(handler={"callable": "catalogue_handlers:asynchronous"}), "spec", "set")),
    Case("handler-django-settings-missing", 2, ("spec.handler.django.settingsModule", "cannot import the settings module 'no_such_settings'"),
         without(M(handler={"callable": "catalogue_handlers:bump",
                            "django": {"model": "shop.Item", "settingsModule": "no_such_settings"}}), "spec", "set")),
    Case("handler-select-only-role", 2, ("spec.handler", "lacks UPDATE"),
         without(M(handler={"callable": "catalogue_handlers:bump"}), "spec", "set"), dsn="reader"),
    Case("handler-raises", 1, ("spec.handler: catalogue_handlers:raises_with_the_password raised ValueError",
                               "catalogue_handlers.py:", "nothing of it was committed"),
         without(M(handler={"callable": "catalogue_handlers:raises_with_the_password"}, checkpoint={"schema": RUNTIME_CHECKPOINTS}),
                 "spec", "set")),
    Case("handler-commits", 1, ("spec.handler", "committed or rolled back the batch transaction itself", "refused"),
         without(M(handler={"callable": "catalogue_handlers:commits"}, checkpoint={"schema": RUNTIME_CHECKPOINTS}), "spec", "set")),
    Case("handler-returns-text", 1, ("spec.handler: catalogue_handlers:returns_text returned str", "number of rows"),
         without(M(handler={"callable": "catalogue_handlers:returns_text"}, checkpoint={"schema": RUNTIME_CHECKPOINTS}), "spec", "set")),
    # -- environments --------------------------------------------------------------------------
    Case("no-dsn", 2, ("no database given", "--dsn", "BACKFILL_DSN"), M(), dsn="none"),
    Case("wrong-password", 4, ("cannot connect to postgres@127.0.0.1", "password authentication failed"), M(), dsn="wrongpw"),
    Case("unreachable-host", 4, ("cannot connect to postgres@127.0.0.1",), M(), dsn="unreachable"),
    Case("unknown-database", 4, ("cannot connect", "does not exist"), M(), dsn="nodb"),
    Case("select-only-role", 2, ("spec.set.counter", "lacks UPDATE"), M(), dsn="reader"),
    Case("select-only-role-delete", 2, ("spec.delete", "lacks DELETE", "GRANT DELETE"), M(set=None, delete={}), dsn="reader"),
    Case("select-only-role-copy", 2, ("spec.copy.table", "lacks INSERT on public.copy_target"),
         M(set=None, copy={"table": "copy_target", "onConflict": "doNothing"}), dsn="reader"),
    Case("default-transaction-read-only", 2, ("spec.database", "read-only"), M(), dsn="readonly"),
    Case("role-cannot-create-checkpoint-table", 2, ("checkpoint table", "atLeastOnce"), M(), dsn="nocreate"),
]

PREPARE: dict[str, dict[str, Any]] = {
    "mismatch-original": M(table="mismatch", set={"v": "v + 1"}, where=None, checkpoint={"schema": "mm_checkpoints"}),
}

runner = CliRunner()


def invoke(path: Path, dsn: str | None, *args: str) -> Any:
    return runner.invoke(app, ["run", str(path), *args], env={"BACKFILL_DSN": dsn, "COLUMNS": "200"}, catch_exceptions=False)


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 30
    assert len({case.id for case in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.id for case in CATALOGUE])
def test_bad_input_fails_clearly_and_changes_nothing(case: Case, env: Env, tmp_path: Path) -> None:
    for number, name in enumerate(case.prepare):
        prepared = tmp_path / f"prepare{number}.yaml"
        original = copy.deepcopy(PREPARE[name])
        original["metadata"]["name"] = case.id
        prepared.write_text(yaml.safe_dump(original))
        assert invoke(prepared, env.admin).exit_code == 0
    path = tmp_path / "bad.yaml"
    if case.raw is not None:
        path.write_text(case.raw)
    else:
        document = copy.deepcopy(case.document) or {}
        if isinstance(document.get("metadata"), dict) and document["metadata"].get("name") == "catalogue":
            document["metadata"]["name"] = case.id  # one identity per case: no case sees another's checkpoint
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    before = snapshot(env.admin)

    result = invoke(path, env.dsn[case.dsn], *case.args)

    output = result.output
    assert result.exit_code == case.expect_exit, output
    for expected in case.expect:
        assert expected in output, f"{expected!r} missing from: {output}"
    assert "Traceback" not in output
    assert_absent(env.secrets, {"cli output": output})
    after = snapshot(env.admin)
    if case.expect_exit == 1:
        # The run started: its plan is recorded, but no batch committed.
        runtime = f"{RUNTIME_CHECKPOINTS}.checkpoints"
        with psycopg.connect(env.admin, autocommit=True) as conn:
            recorded = conn.execute(
                sql.SQL("SELECT rows_updated, batches, last_key FROM {} WHERE identity = %s").format(
                    sql.Identifier(RUNTIME_CHECKPOINTS, "checkpoints")),
                [f"bad/{case.id}"],
            ).fetchall()
        assert recorded == [(0, 0, None)]
        before.pop(runtime, None), after.pop(runtime, None)
    assert after == before, "rows or checkpoints changed"


# -- identifiers that look hostile but are legal: these must WORK -------------------------------

HOSTILE = [
    # (schema, table, key column, set column)
    ("public", 'we"ird', "id", "value"),
    ("public", "semi;colon; DROP TABLE items", "id", "value"),
    ("Mixed Case", "Tâble ünïcødé", "clé", "Größe"),
    ("dot.schema", "dot.table", 'k"ey', "val;ue"),
    ("public", "表格", "标识", "值 -- not a comment"),
    ("emoji 🚀", "rows 🎯", "id 🔑", "v 💾"),
]


def quote_part(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.mark.parametrize("schema,table,key,column", HOSTILE, ids=[f"{t}" for _, t, _, _ in HOSTILE])
def test_hostile_identifiers_work(database: str, tmp_path: Path, schema: str, table: str, key: str, column: str) -> None:
    qualified = sql.Identifier(schema, table)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} bigint PRIMARY KEY, {} int NOT NULL DEFAULT 0, flag bool NOT NULL)").format(
                qualified, sql.Identifier(key), sql.Identifier(column)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO {} ({}, flag) SELECT g, g % 3 = 0 FROM generate_series(1, 900) g").format(
                qualified, sql.Identifier(key)
            )
        )
        items_before = conn.execute("SELECT to_regclass('public.items')").fetchone()
    document = base_manifest(
        table=f"{quote_part(schema)}.{quote_part(table)}",
        key=[key],
        set={column: f"{quote_part(column)} + 1"},
        where=f"flag AND {quote_part(key)} > 0",
        batch={"size": 100, "minSize": 10, "maxSize": 100},
        checkpoint={"schema": f"ckpt {schema}; \"x\""},
    )
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")

    result = invoke(path, database)

    assert result.exit_code == 0, result.output
    assert "state=done rows_updated=300" in result.output
    with psycopg.connect(database, autocommit=True) as conn:
        counts = conn.execute(
            sql.SQL("SELECT count(*) FILTER (WHERE {c} = 1 AND flag), count(*) FILTER (WHERE {c} = 0 AND NOT flag) FROM {t}").format(
                c=sql.Identifier(column), t=qualified
            )
        ).fetchone()
        assert counts == (300, 600)
        # Nothing else was created or dropped by the odd names.
        assert conn.execute("SELECT to_regclass('public.items')").fetchone() == items_before
        checkpoints = conn.execute(
            sql.SQL("SELECT state FROM {}").format(sql.Identifier(f"ckpt {schema}; \"x\"", "checkpoints"))
        ).fetchall()
        assert checkpoints == [("done",)]


# -- the operator path: bad references and specs reported as conditions -------------------------
# The real operator against kmock (which, like an old API server, does no schema validation, so
# the operator's own validation is what is tested), with the real worker started by the fake
# kubelet for the cases that get as far as a Job. Each case is one Backfill of its own.

import asyncio  # noqa: E402
import base64  # noqa: E402

from kube_support.emulator import ApiServerEmulator, declare_resources  # noqa: E402
from kube_support.operator_thread import operator_running_async  # noqa: E402
from support_faults.kubelet import FakeKubelet, write_kubeconfig  # noqa: E402

from backfill_api.kubeapi import KubeApi, backfill_path, core_path  # noqa: E402
from backfill_operator.main import OperatorConfig  # noqa: E402

KNS = "catalogue"


@dataclass(frozen=True)
class KubeCase:
    id: str
    spec: dict[str, Any]
    reason: str
    """Expected reason of the Stalled condition."""
    expect: tuple[str, ...]
    """Substrings of status.message / the condition message naming the field or cause."""
    job: bool = False
    """Whether the case gets as far as a worker Job (worker-side failures)."""


DB_REF = {"dsnSecretRef": {"name": "db", "key": "dsn"}}
KUBE_CATALOGUE = [
    KubeCase("secret-missing", {"database": {"dsnSecretRef": {"name": "absent"}}}, "SecretNotFound",
             ("Secret catalogue/absent", "spec.database.dsnSecretRef.name", "kubectl -n catalogue create secret")),
    KubeCase("secret-key-missing", {"database": {"dsnSecretRef": {"name": "db", "key": "url"}}}, "SecretKeyNotFound",
             ("no key 'url'", "spec.database.dsnSecretRef.key")),
    KubeCase("secret-ref-absent", {"database": {}}, "SecretRefMissing", ("spec.database.dsnSecretRef is required",)),
    KubeCase("unknown-field", {"database": DB_REF, "batch": {"sise": 5}}, "InvalidSpec", ("spec.batch.sise", "unknown field")),
    KubeCase("schema-violation", {"database": DB_REF, "batch": {"size": 0}}, "InvalidSpec", ("spec.batch.size",)),
    KubeCase("bad-memory-quantity", {"database": DB_REF, "worker": {"resources": {"limits": {"memory": "20MB"}}}},
             "InvalidSpec", ("spec.worker.resources.limits.memory", "256Mi")),
    KubeCase("where-invalid-worker", {"database": DB_REF, "where": "colour = 'red'"}, "ValidationFailed",
             ("spec.where", "colour"), job=True),
    KubeCase("bad-time-zone", {"database": DB_REF, "schedule": {"timeZone": "Mars/Olympus", "windows": [
             {"start": "22:00", "end": "06:00"}]}}, "InvalidSpec", ("spec.schedule.timeZone", "unknown time zone")),
    KubeCase("health-query-no-row-worker", {"database": DB_REF, "limits": {"health": {"query": "SELECT true WHERE false"}}},
             "ValidationFailed", ("spec.limits.health.query", "returned no row"), job=True),
    KubeCase("ctid-without-where", {"database": DB_REF, "walk": "ctid", "where": None, "batch": BLOCKS}, "InvalidSpec",
             ("walk: ctid needs spec.where",)),
    KubeCase("ctid-where-stays-true-worker", {"database": DB_REF, "walk": "ctid", "set": {"counter": "counter + 1"}, "batch": BLOCKS},
             "ValidationFailed", ("spec.where", "still match where after the change"), job=True),
    KubeCase("wrong-password-worker", {"database": {"dsnSecretRef": {"name": "db-wrong"}}}, "ConnectionFailed",
             ("password authentication failed",), job=True),
]


@pytest.mark.kmock(cls=ApiServerEmulator)
@pytest.mark.timeout(180)
async def test_operator_path_bad_input_is_a_condition_and_changes_nothing(kmock, env: Env, tmp_path: Path) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    to_thread = asyncio.to_thread
    for name, dsn in (("db", env.admin), ("db-wrong", env.dsn["wrongpw"])):
        await to_thread(api.create, core_path(KNS, "secrets"), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": KNS},
            "data": {"dsn": base64.b64encode(str(dsn).encode()).decode()}})
    before = await to_thread(snapshot, env.admin)
    kubelet = FakeKubelet(api, KNS, write_kubeconfig(tmp_path, str(kmock.url)), tmp_path)
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop))
    config = OperatorConfig(namespaces=(KNS,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)
    results: dict[str, dict[str, Any]] = {}
    try:
        async with operator_running_async(config):
            for case in KUBE_CATALOGUE:
                document = base_manifest(**case.spec)
                document["metadata"] = {"name": case.id, "namespace": KNS}
                await to_thread(api.create, backfill_path(KNS), document)
            deadline = asyncio.get_running_loop().time() + 90
            while len(results) < len(KUBE_CATALOGUE) and asyncio.get_running_loop().time() < deadline:
                for case in KUBE_CATALOGUE:
                    obj = await to_thread(api.get, backfill_path(KNS, case.id))
                    stalled_now = [c for c in (obj.get("status") or {}).get("conditions") or []
                                   if c["type"] == "Stalled" and c["status"] == "True"]
                    if stalled_now and (not case.job or obj["status"].get("phase") == "Failed"):
                        results[case.id] = obj
                await asyncio.sleep(0.3)
        jobs = list(kubelet.jobs_seen)  # every Job ever created (the operator may delete failed ones)
    finally:
        stop.set()
        await kubelet_task
        kubelet.kill_all()
        api.close()

    assert set(results) == {case.id for case in KUBE_CATALOGUE}, f"no Stalled condition for {set(c.id for c in KUBE_CATALOGUE) - set(results)}"
    for case in KUBE_CATALOGUE:
        status = results[case.id]["status"]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert stalled["reason"] == case.reason, (case.id, stalled)
        assert ready["status"] == "False", (case.id, ready)
        text = f"{status.get('message', '')} {stalled.get('message', '')}"
        for expected in case.expect:
            assert expected in text, (case.id, expected, text)
        assert (f"{case.id}-s0-r1" in jobs) == case.job, (case.id, jobs)
        assert_absent(env.secrets, {case.id: json.dumps(status)})
    # Exactly the worker-side cases ever got a Job (kmock's request log: nothing missed by polling).
    posted = [r for r in kmock if r.method == "POST" and str(r.url.path).endswith("/jobs")]
    assert len(posted) == sum(case.job for case in KUBE_CATALOGUE)
    assert await to_thread(snapshot, env.admin) == before, "rows or checkpoints changed"
    assert_absent(env.secrets, kubelet.output())


# -- the Django layer: migrations and manage.py backfill (examples/django, real subprocesses) ---
# One database migrated to the example's 0001 with customers in it; every case runs `manage.py`
# and must fail with its documented status and message, without a traceback or a secret, with
# every table (and the absence of any checkpoint) exactly as before.

from django_shop import manage as shop_manage  # noqa: E402
from django_shop import seed_customers  # noqa: E402


@dataclass(frozen=True)
class DjangoCase:
    id: str
    args: tuple[str, ...]
    expect_exit: int
    expect: tuple[str, ...]
    migrations: str = "bfdj_sql"
    env: tuple[tuple[str, str], ...] = ()


DJANGO_CATALOGUE = [
    DjangoCase("queue-in-atomic-migration", ("migrate",), 1,
               ("QueueBackfill shop/customers-inactive-sql: this migration runs in a transaction", "Add `atomic = False`"),
               migrations="bfdj_atomic"),
    DjangoCase("queue-manifest-missing", ("migrate",), 1, ("QueueBackfill:", "no-such-backfill.yaml", "cannot read"),
               migrations="bfdj_missing"),
    DjangoCase("mode-unknown", ("migrate",), 1, ("$BACKFILL_MODE / settings.BACKFILL['MODE']", "'kubernetes' is not a mode"),
               env=(("BACKFILL_MODE", "kubernetes"),)),
    DjangoCase("cluster-mode-without-cluster", ("migrate",), 1, ("BACKFILL_MODE=cluster, but no cluster configuration",),
               env=(("BACKFILL_MODE", "cluster"), ("KUBECONFIG", "/nonexistent/kubeconfig"))),
    DjangoCase("manage-unknown-database-alias", ("backfill", "--database", "replica", "run", "backfill.yaml"), 2,
               ("database: settings.DATABASES has no alias 'replica'",)),
    DjangoCase("manage-unknown-subcommand", ("backfill", "apply", "backfill.yaml"), 1, ("give a subcommand: run, plan, status, reset",)),
]


@pytest.fixture(scope="module")
def shop_database(pg_server: LocalPostgres) -> Iterator[str]:
    name = f"catalogue_shop_{SUFFIX}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = pg_server.dsn(dbname=name)
    try:
        assert shop_manage(dsn, "migrate", "contenttypes", migrations="bfdj_sql").returncode == 0  # the other app's
        assert shop_manage(dsn, "migrate", "customers", "0001", migrations="bfdj_sql").returncode == 0
        seed_customers(dsn, 300)
        yield dsn
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize("case", DJANGO_CATALOGUE, ids=[case.id for case in DJANGO_CATALOGUE])
def test_django_bad_input_fails_clearly_and_changes_nothing(case: DjangoCase, shop_database: str) -> None:
    before = snapshot(shop_database)
    result = shop_manage(shop_database, *case.args, migrations=case.migrations, **dict(case.env))
    output = result.stdout + result.stderr
    assert result.returncode == case.expect_exit, output[-3000:]
    for expected in case.expect:
        assert expected in output, f"{expected!r} missing from: {output[-3000:]}"
    assert "Traceback" not in output
    assert_absent([CANARY_PASSWORD, shop_database], {"manage.py output": output})
    assert snapshot(shop_database) == before, "rows or checkpoints changed"
