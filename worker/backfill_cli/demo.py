"""The ``backfill demo`` data set and manifest: the seed's ``customers`` table and its backfill."""

from __future__ import annotations

import psycopg

from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill

CUTOFF = "interval '365 days'"

DEMO_MANIFEST = {
    "apiVersion": "backfill.dev/v1alpha1",
    "kind": "Backfill",
    "metadata": {"name": "customers-inactive", "namespace": "demo"},
    "spec": {
        "table": "public.customers",
        "set": {"status": "'inactive'"},
        "where": f"last_login < now() - {CUTOFF} AND status IS NULL",
        "batch": {"size": 1000, "targetDuration": "50ms", "minSize": 100, "maxSize": 50000},
    },
}


def demo_backfill() -> Backfill:
    return parse_backfill(DEMO_MANIFEST, source="demo manifest")


def seed_customers(conn: psycopg.Connection, rows: int) -> None:
    """``customers(id bigint PK, email, last_login timestamptz, status text NULL)``.

    ``last_login`` spreads over the last two years, so about half the rows are older than a year.
    Generated server-side in one statement: fast and deterministic (no client round trips).
    """
    with conn.transaction():
        conn.execute("DROP TABLE IF EXISTS public.customers")
        conn.execute(
            """
            CREATE TABLE public.customers (
                id bigint PRIMARY KEY,
                email text NOT NULL,
                last_login timestamptz NOT NULL,
                status text
            )
            """
        )
        conn.execute(
            """
            INSERT INTO public.customers (id, email, last_login, status)
            SELECT i, 'customer' || i || '@example.com',
                   now() - make_interval(secs => ((i::bigint * 7919) %% 730) * 86400 + (i %% 86400)),
                   NULL
            FROM generate_series(1, %s) AS i
            """,
            [rows],
        )
    conn.execute("VACUUM (ANALYZE) public.customers")


def matching_rows(conn: psycopg.Connection) -> int:
    row = conn.execute(f"SELECT count(*) FROM public.customers WHERE last_login < now() - {CUTOFF} AND status IS NULL").fetchone()
    return int(row[0]) if row else 0


def changed_rows(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM public.customers WHERE status = 'inactive'").fetchone()
    return int(row[0]) if row else 0
