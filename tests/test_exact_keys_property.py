"""Property: whatever the key type, collation, role/database settings and shard count, every
matching row is changed exactly once, no other row is touched, and verification reports 0.

Hypothesis draws the keys themselves (floats with NaN, infinities and -0.0, text with any
printable character under "C", libc and ICU collations, timestamps with microseconds...), the
session settings a role or database may impose (``ALTER ROLE/DATABASE ... SET``) and
``parallelism`` 1..3. Examples are reproducible: the seed is fixed (``BACKFILL_HYPOTHESIS_SEED``
overrides it) and printed; hypothesis also prints the failing example and a replay blob.
Runs against the suite's one shared PostgreSQL; each example gets its own database.
"""

from __future__ import annotations

import math
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from psycopg import sql
from session_roles import role_with_settings

from backfill_api.manifest import parse_backfill
from backfill_worker.run.engine import run_backfill

SEED = int(os.environ.get("BACKFILL_HYPOTHESIS_SEED", "20261202"))
EXAMPLES_PER_KIND = int(os.environ.get("BACKFILL_HYPOTHESIS_EXAMPLES", "4"))
COLLATIONS = ("C", "C.utf8", "und-x-icu", "sv-x-icu", "tr-x-icu")


@dataclass(frozen=True)
class KeyKind:
    name: str
    column_sql: Callable[[str], str]
    """Column definitions of the key, given a collation for text columns."""
    values: st.SearchStrategy[Any]
    identity: Callable[[Any], Any]
    """What equal keys share (so the drawn keys are unique the way the unique index sees them)."""
    columns: tuple[str, ...] = ("id",)


def _float_identity(value: float) -> Any:
    return "nan" if math.isnan(value) else value  # -0.0 == 0.0, like PostgreSQL


# Ratios need all 17 significant digits: the floats whose text form a setting could round.
_RATIOS = st.builds(lambda a, b: a / b, st.integers(-(10**9), 10**9), st.integers(3, 9999))
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_UTC_OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=13, minutes=45)), timezone(-timedelta(hours=3, minutes=30))])

KINDS = [
    KeyKind("int", lambda c: "id int", st.integers(-(2**31), 2**31 - 1), lambda v: v),
    KeyKind("bigint", lambda c: "id bigint", st.integers(-(2**63), 2**63 - 1), lambda v: v),
    KeyKind("numeric", lambda c: "id numeric",
            st.decimals(allow_nan=False, allow_infinity=False, places=None, min_value=Decimal("-1e30"), max_value=Decimal("1e30")),
            lambda v: v),
    KeyKind("float8", lambda c: "id float8", st.one_of(_RATIOS, st.floats(allow_nan=True, allow_infinity=True)),
            _float_identity),
    KeyKind("float4", lambda c: "id float4", st.one_of(_RATIOS.map(lambda v: float(struct.unpack("f", struct.pack("f", v))[0])),
                      st.floats(width=32, allow_nan=True, allow_infinity=True)),
            _float_identity),
    KeyKind("text", lambda c: f'id text COLLATE "{c}"', _TEXT, lambda v: v),
    KeyKind("uuid", lambda c: "id uuid", st.uuids(), lambda v: v),
    KeyKind("date", lambda c: "id date", st.dates(), lambda v: v),
    KeyKind("timestamp", lambda c: "id timestamp", st.datetimes(), lambda v: v),
    KeyKind("timestamptz", lambda c: "id timestamptz", st.datetimes(timezones=_UTC_OFFSETS), lambda v: v),
    KeyKind("interval", lambda c: "id interval",
            st.timedeltas(min_value=timedelta(days=-10**6), max_value=timedelta(days=10**6)), lambda v: v),
    KeyKind("composite (int, text)", lambda c: f'a int, b text COLLATE "{c}"', st.tuples(st.integers(-3, 3), _TEXT),
            lambda v: v, ("a", "b")),
]

SETTING_CHOICES: dict[str, list[str]] = {
    "extra_float_digits": ["-15", "0", "1", "3"],
    "DateStyle": ["ISO, MDY", "SQL, DMY", "German", "Postgres, MDY", "SQL, MDY"],
    "IntervalStyle": ["postgres", "postgres_verbose", "sql_standard", "iso_8601"],
    "TimeZone": ["UTC", "Pacific/Chatham", "America/St_Johns", "Asia/Kathmandu"],
    "bytea_output": ["hex", "escape"],
    "lc_monetary": ["C", "C.utf8"],
    "lc_numeric": ["C", "C.utf8"],
}
hostile_settings = st.fixed_dictionaries({name: st.sampled_from(values) for name, values in SETTING_CHOICES.items()})


@st.composite
def cases(draw: st.DrawFn, kind: KeyKind) -> dict[str, Any]:
    keys = draw(st.lists(kind.values, min_size=1, max_size=25, unique_by=kind.identity))
    return {
        "collation": draw(st.sampled_from(COLLATIONS)),
        "rows": [(key, draw(st.booleans())) for key in keys],
        "settings": draw(hostile_settings),
        "settings_on": draw(st.sampled_from(["role", "database"])),
        "parallelism": draw(st.integers(1, 3)),
        "batch": draw(st.integers(1, 5)),
    }


def test_seed_is_printed() -> None:
    print(
        f"exact-keys property test: seed {SEED}, {EXAMPLES_PER_KIND} examples for each of {len(KINDS)} key types; "
        f"replay with BACKFILL_HYPOTHESIS_SEED={SEED}"
    )


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_any_key_any_session_changes_each_matching_row_once(database: str, kind: KeyKind) -> None:
    @seed(SEED)
    @settings(max_examples=EXAMPLES_PER_KIND, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cases(kind))
    def property_holds(case: dict[str, Any]) -> None:
        _example(database, kind, case)

    property_holds()


def _example(superuser_dsn: str, kind: KeyKind, case: dict[str, Any]) -> None:
    """One example in its own schema of the test's database (cheap: shrinking reruns many)."""
    schema = f"h_{uuid.uuid4().hex[:12]}"
    table = sql.Identifier(schema, "t")
    key_columns = sql.SQL(", ").join(map(sql.Identifier, kind.columns))
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        dbname = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(
            f"CREATE TABLE {{}} ({kind.column_sql(case['collation'])}, hit bool NOT NULL, counter int NOT NULL DEFAULT 0, "
            "PRIMARY KEY ({}))"
        ).format(table, key_columns))
        with conn.cursor() as cur:
            placeholders = sql.SQL(", ").join(sql.Placeholder() * (len(kind.columns) + 1))
            cur.executemany(
                sql.SQL("INSERT INTO {} ({}, hit) VALUES ({})").format(table, key_columns, placeholders),
                [(*(key if len(kind.columns) > 1 else (key,)), hit) for key, hit in case["rows"]],
            )
        if case["settings_on"] == "database":
            for setting, value in case["settings"].items():
                conn.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(
                    dbname, sql.Identifier(setting.lower()), sql.Literal(value)))
    backfill = parse_backfill({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": schema.replace("_", "-"), "namespace": "t"},
        "spec": {"table": f"{schema}.t", "key": list(kind.columns), "set": {"counter": "counter + 1"},
                 "where": "hit AND counter = 0", "parallelism": case["parallelism"], "checkpoint": {"schema": schema},
                 "batch": {"size": case["batch"], "minSize": 1, "maxSize": case["batch"], "targetDuration": "0"}},
    })
    try:
        if case["settings_on"] == "role":
            with role_with_settings(superuser_dsn, case["settings"]) as dsn:
                report = run_backfill(backfill, dsn)
        else:
            report = run_backfill(backfill, superuser_dsn)
        with psycopg.connect(superuser_dsn, autocommit=True) as conn:
            wrong = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE counter <> hit::int").format(table)).fetchone()[0]  # type: ignore[index]
            total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]  # type: ignore[index]
    finally:
        with psycopg.connect(superuser_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET ALL").format(dbname))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    expected = sum(hit for _, hit in case["rows"])
    detail = f"seed {SEED}; {kind.name} under {case['settings']} on the {case['settings_on']}"
    assert total == len(case["rows"]), detail
    assert (report.state, wrong, report.rows_updated, report.remaining_matches) == ("done", 0, expected, 0), detail
