"""Handlers for the bad-input catalogue (tests/test_bad_input_catalogue.py): each misbehaves once."""

from __future__ import annotations

from typing import Any

NOT_A_FUNCTION = 42


def bump(batch: Any) -> int:
    pred, params = batch.predicate()
    from psycopg import sql

    statement = sql.SQL("UPDATE {} SET counter = counter + 1 WHERE {}").format(batch.table_identifier, pred)
    return int(batch.connection.execute(statement, params).rowcount)


def two_parameters(batch: Any, other: Any) -> None: ...


async def asynchronous(batch: Any) -> None: ...


def raises_with_the_password(batch: Any) -> None:
    bump(batch)
    raise ValueError(f"could not reach the billing API (password={batch.connection.info.password})")


def commits(batch: Any) -> None:
    bump(batch)
    batch.connection.commit()


def returns_text(batch: Any) -> str:
    bump(batch)
    return "done"
