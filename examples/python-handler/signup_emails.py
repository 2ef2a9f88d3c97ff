"""A plain psycopg handler: normalise sign-up emails with Python's own Unicode and IDNA rules.

``spec.handler.callable: signup_emails:normalize``. SQL alone cannot do this well: NFKC folds
full-width and compatibility characters (full-width ``John``, the ``fi`` ligature), and the domain is converted to
its ASCII (punycode) form with Python's ``idna`` codec (``bücher.example`` -> ``xn--bcher-kva.example``).
Rows that cannot be normalised get ``email_problem`` instead, so the run never stops on bad data.
"""

from __future__ import annotations

import unicodedata

from psycopg import sql

from backfill_worker.changes.handlers import Batch


def normalized(email: str) -> str:
    """``local@domain`` with NFKC applied, surrounding space removed, and the domain lower-cased ASCII (IDNA)."""
    text = unicodedata.normalize("NFKC", email).strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("not of the form local@domain")
    return f"{local}@{domain.lower().encode('idna').decode('ascii')}"


def normalize(batch: Batch) -> int:
    """Set ``email_normalized`` (or ``email_problem``) for every row of the batch that still lacks it."""
    updates: list[tuple[str | None, str | None, int]] = []
    for row in batch.rows():  # locked, in key order, only rows still matching spec.where
        try:
            updates.append((normalized(row["email"]), None, row["id"]))
        except (ValueError, UnicodeError) as error:
            updates.append((None, str(error)[:200], row["id"]))
    statement = sql.SQL("UPDATE {} SET email_normalized = %s, email_problem = %s WHERE id = %s").format(batch.table_identifier)
    with batch.connection.cursor() as cursor:
        cursor.executemany(statement, updates)
    return len(updates)
