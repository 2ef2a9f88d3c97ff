"""A seeded table plus a frozen snapshot, and the exactness check every fault test ends with.

The seeded table ``items`` has a non-idempotent backfill in mind: ``counter = counter + 1`` for
rows with ``grp < 50`` (about half, pseudo-randomly spread over the key). After the run, each
row is compared with its snapshot: a matching row must have ``counter`` exactly one higher, a
non-matching row must be untouched, and no other column may differ (``app_counter`` may only
differ by what the test's own application workload recorded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psycopg
from manifests import backfill_document
from psycopg import sql

TABLE = "items"
SNAPSHOT = "items_snapshot"
WHERE = "grp < 50"
SET = {"counter": "counter + 1"}
MATCHES = "s.grp < 50"
"""``WHERE`` evaluated on the snapshot alias ``s`` (grp is never changed by anyone)."""


def seed(dsn: str, rows: int, *, step: int = 1, table: str = TABLE) -> None:
    """``rows`` rows with keys ``step, 2*step, ...`` in one INSERT, then the snapshot.

    ``step > 1`` leaves gaps so an application workload can insert inside the key range.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(table)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, grp int NOT NULL, counter int NOT NULL,"
                " app_counter int NOT NULL DEFAULT 0, payload text NOT NULL)"
            ).format(ident)
        )
        # grp: a multiplicative hash of the key, so matching rows are spread over every batch.
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, grp, counter, payload)"
                " SELECT g * %s, (g * 7919) %% 100, g %% 7, md5(g::text) FROM generate_series(1::bigint, %s) AS g"
            ).format(ident),
            [step, rows],
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))
        conn.execute(
            sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(sql.Identifier(f"{table}_snapshot"), ident)
        )
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(f"{table}_snapshot")))


def manifest(name: str, **spec: object) -> dict:
    """A Backfill document for the seeded table; ``spec`` overrides/extends the defaults."""
    body: dict = {"table": TABLE, "set": dict(SET), "where": WHERE}
    body.update(spec)
    return backfill_document(name, "faults", **body)


@dataclass(frozen=True)
class Ledger:
    """The outcome of comparing the table with its snapshot."""

    rows_checked: int
    """Snapshot rows compared (every pre-existing row)."""
    matching: int
    """Snapshot rows the ``where`` selects."""
    changed_once: int
    missed: int
    """Matching rows left unchanged."""
    doubled: int
    """Matching rows incremented more than once (or decremented)."""
    wrongly_changed: int
    """Non-matching rows whose counter changed."""
    lost: int
    """Rows missing that nobody deleted."""
    other_columns_changed: int
    """Rows whose grp/payload/app_counter differ from what is expected."""

    @property
    def lost_or_doubled(self) -> int:
        return self.missed + self.doubled + self.wrongly_changed + self.lost + self.other_columns_changed

    def assert_exact(self) -> None:
        assert self.rows_checked > 0
        assert self.lost_or_doubled == 0, f"rows not changed exactly once: {self}"
        assert self.changed_once == self.matching, self


def check(
    dsn: str,
    *,
    deleted: Iterable[int] = (),
    app_increments: Mapping[int, int] | None = None,
    table: str = TABLE,
) -> Ledger:
    """Compare ``table`` with its snapshot. ``deleted`` rows must be gone; ``app_increments``
    gives how much the application itself added to ``app_counter`` per key."""
    snapshot = sql.Identifier(f"{table}_snapshot")
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE TEMP TABLE deleted_by_app (id bigint PRIMARY KEY) ON COMMIT DROP")
        conn.execute("CREATE TEMP TABLE app_increments (id bigint PRIMARY KEY, n int NOT NULL) ON COMMIT DROP")
        with conn.cursor().copy("COPY deleted_by_app (id) FROM STDIN") as copy:
            for key in set(deleted):
                copy.write_row((key,))
        with conn.cursor().copy("COPY app_increments (id, n) FROM STDIN") as copy:
            for key, n in (app_increments or {}).items():
                copy.write_row((key, n))
        row = conn.execute(
            sql.SQL(
                """
                SELECT count(*),
                       count(*) FILTER (WHERE {m} AND d.id IS NULL),
                       count(*) FILTER (WHERE {m} AND t.counter = s.counter + 1),
                       count(*) FILTER (WHERE {m} AND t.counter = s.counter),
                       count(*) FILTER (WHERE {m} AND t.counter NOT IN (s.counter, s.counter + 1)),
                       count(*) FILTER (WHERE NOT {m} AND t.counter <> s.counter),
                       count(*) FILTER (WHERE t.id IS NULL AND d.id IS NULL),
                       count(*) FILTER (WHERE d.id IS NOT NULL AND t.id IS NOT NULL
                                           OR (t.grp, t.payload, t.app_counter)
                                              IS DISTINCT FROM (s.grp, s.payload, s.app_counter + coalesce(a.n, 0))
                                              AND t.id IS NOT NULL)
                FROM {snap} s
                LEFT JOIN {t} t USING (id)
                LEFT JOIN deleted_by_app d USING (id)
                LEFT JOIN app_increments a USING (id)
                """
            ).format(m=sql.SQL(MATCHES), snap=snapshot, t=sql.Identifier(table)),
        ).fetchone()
    assert row is not None
    return Ledger(*[int(v) for v in row])


def report(fault: str, *, faults_injected: int, runs: int, ledger: Ledger, **extra: object) -> None:
    """Print one machine-readable figures line (copied into the README's table)."""
    figures(fault, faults_injected=faults_injected, runs=runs, rows_checked=ledger.rows_checked,
            lost_or_doubled=ledger.lost_or_doubled, **extra)


def figures(fault: str, **values: object) -> None:
    """The ``FAULT-FIGURES {json}`` line; ``pytest -s tests/faults`` shows them all."""
    print("FAULT-FIGURES " + json.dumps({"fault": fault, **values}, sort_keys=True), flush=True)
