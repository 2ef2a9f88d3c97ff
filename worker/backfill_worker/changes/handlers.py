"""Python handlers (``spec.handler``): the batch a handler receives, loading it, guarding its transaction.

A handler is ``def deactivate(batch: Batch) -> int | None``. The engine opens the batch's
transaction, calls the handler with the batch, then writes the checkpoint and commits: the
handler's writes and the checkpoint are one transaction, so even non-idempotent code runs
exactly once per row (docs/handlers.md). The change itself is ``changes.PythonHandler``.

Guarding the transaction: only the engine may end it. Each batch arms a deferred constraint
trigger on a session-temporary table; at COMMIT it raises unless the engine released it after
the handler returned. So a handler's ``conn.commit()`` or ``COMMIT`` statement fails (the
whole batch rolls back); a ``ROLLBACK`` (or a commit whose error the handler swallowed) is
seen after the call: the marker row is gone, and the run fails naming ``spec.handler``. The
batch runs with ``autocommit`` off, so anything the handler writes after ending the
transaction itself is in a new, implicit transaction that the engine rolls back.
"""

from __future__ import annotations

import importlib
import inspect
import secrets as token_source
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from backfill_api.errors import HandlerFailed, ValidationFailed
from backfill_api.model import BackfillSpec, HandlerSpec
from backfill_worker.checkpoints.checkpoint import Key
from backfill_worker.sql import statements
from backfill_worker.sql.connection import Connections
from backfill_worker.sql.secrets import redact
from backfill_worker.sql.statements import Target

__all__ = ["Batch", "Handler", "HandlerFailed", "Runtime", "describe_exception", "load", "make_batch", "runtime_for"]

FIELD = "spec.handler"
CALLABLE_FIELD = "spec.handler.callable"


@dataclass
class _Yielded:
    rows: int = 0


@dataclass(frozen=True)
class Batch:
    """One batch, as a handler sees it: inside the open batch transaction.

    ``lower < key <= upper`` (``lower`` is None for the first batch of the first shard). Do not
    commit or roll back ``connection``: the engine commits the batch with its checkpoint.
    """

    connection: psycopg.Connection
    """The batch's connection, inside its transaction (``autocommit`` off; do not commit)."""
    lower: tuple[Any, ...] | None
    """Exclusive lower bound of the key range, as the key columns' Python values (None: open)."""
    upper: tuple[Any, ...]
    """Inclusive upper bound of the key range, as the key columns' Python values."""
    table: tuple[str, str]
    """``(schema, name)`` of the target table."""
    key: tuple[str, ...]
    """The key columns (in index order)."""
    shard: int
    """The shard this batch belongs to (0 .. spec.parallelism - 1)."""
    _target: Target = field(repr=False)
    _lower_text: Key | None = field(repr=False)
    _upper_text: Key = field(repr=False)
    _yielded: _Yielded = field(default_factory=_Yielded, repr=False)

    @property
    def table_identifier(self) -> sql.Identifier:
        """``schema.table``, quoted, for statements the handler composes with ``psycopg.sql``."""
        return self._target.table_identifier

    def predicate(self) -> tuple[sql.Composed, list[str | None]]:
        """``(key range AND (where), params)``: the batch's rows, for a set-based statement of your own::

            pred, params = batch.predicate()
            batch.connection.execute(sql.SQL("UPDATE {} SET x = f(x) WHERE {}").format(batch.table_identifier, pred), params)
        """
        statement = statements.batch_predicate(self._target, has_lower=self._lower_text is not None)
        return statement, statements.range_params(self._lower_text, self._upper_text)

    def rows(self) -> Iterator[dict[str, Any]]:
        """The rows of the range still matching ``where``, in key order, locked (``FOR NO KEY UPDATE``), as dicts."""
        statement = statements.lock_batch_rows(self._target, has_lower=self._lower_text is not None)
        with self.connection.cursor(row_factory=dict_row) as cursor:
            fetched = cursor.execute(statement, statements.range_params(self._lower_text, self._upper_text)).fetchall()
        for row in fetched:
            self._yielded.rows += 1
            yield row

    @property
    def rows_yielded(self) -> int:
        """How many rows :meth:`rows` has yielded so far (what a handler returning None is counted as)."""
        return self._yielded.rows


Handler = Callable[[Batch], "int | None"]


def make_batch(conn: psycopg.Connection, target: Target, lower: Key | None, upper: Key, shard: int) -> Batch:
    """The :class:`Batch` of ``lower < key <= upper``, its bounds read back as the key columns' types."""
    texts = [*(lower or ()), *upper]
    row = conn.execute(statements.typed_keys(target, len(texts) // len(target.key)), texts).fetchone()
    values = tuple(row) if row is not None else ()
    width = len(target.key)
    typed_lower = values[:width] if lower is not None else None
    typed_upper = values[-width:]
    return Batch(conn, typed_lower, typed_upper, (target.schema, target.table), target.key, shard, target, lower, upper)


# -- loading ------------------------------------------------------------------------------------


def load(spec: HandlerSpec, redact_text: Callable[[str], str] = redact) -> Handler:
    """Import ``spec.callable`` and check it takes exactly one positional parameter (the batch)."""
    module_name, _, attribute_path = spec.callable.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(f"{error.name}.")):
            raise ValidationFailed(
                CALLABLE_FIELD,
                f"cannot import module {module_name!r}: no module named {error.name!r}. Install your code where the "
                "worker runs (in Kubernetes: spec.worker.image = your application's image) or put its directory on "
                "PYTHONPATH (e.g. PYTHONPATH=. backfill run ...)",
            ) from None
        raise ValidationFailed(CALLABLE_FIELD, f"importing {module_name!r} failed: {describe_exception(error, redact_text)}") from None
    except Exception as error:  # noqa: BLE001 - user code runs at import: any exception is the user's to see
        raise ValidationFailed(CALLABLE_FIELD, f"importing {module_name!r} failed: {describe_exception(error, redact_text)}") from None
    target: Any = module
    walked = module_name
    for part in attribute_path.split("."):
        if not hasattr(target, part):
            raise ValidationFailed(CALLABLE_FIELD, f"{walked!r} has no attribute {part!r}: check the name after ':'")
        target = getattr(target, part)
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise ValidationFailed(CALLABLE_FIELD, f"{spec.callable} is a {type(target).__name__}, not a function: name a function taking the batch")
    if inspect.iscoroutinefunction(target):
        raise ValidationFailed(CALLABLE_FIELD, f"{spec.callable} is an async function: handlers run inside the batch transaction, synchronously; use def, not async def")
    problem = signature_problem(target)
    if problem is not None:
        raise ValidationFailed(CALLABLE_FIELD, f"{spec.callable} {problem}: a handler takes exactly one positional parameter, the batch: def handler(batch): ...")
    handler: Handler = target
    return handler


def signature_problem(function: Callable[..., object]) -> str | None:
    """Why ``function`` cannot be called as ``function(batch)`` (PURE); None if it can."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # builtins without a signature: the call itself will tell
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_keywords = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) != 1:
        names = ", ".join(p.name for p in positional) or "none"
        return f"takes {len(positional)} positional parameters ({names})"
    if required_keywords:
        return f"also requires the keyword-only parameters {required_keywords}"
    return None


def describe_exception(error: BaseException, redact_text: Callable[[str], str] = redact) -> str:
    """``Type: message (at file:line in function)`` of an exception raised by user code, redacted."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" (at {error.filename}:{error.lineno})"
    elif frames:
        frame = frames[-1]
        where = f" (at {frame.filename}:{frame.lineno} in {frame.name})"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return redact_text(f"{type(error).__name__}{': ' + message if message else ''}{where}")


def handler_location(error: BaseException, handler: Callable[..., object]) -> str:
    """``file:line in function`` of the deepest frame in the handler's own source file, and where
    the error was raised when that is elsewhere (a library the handler called)."""
    frames = traceback.extract_tb(error.__traceback__)
    code = getattr(handler, "__code__", None)
    own_file = code.co_filename if code is not None else None
    own = [frame for frame in frames if frame.filename == own_file]
    parts = []
    if own:
        parts.append(f"at {own[-1].filename}:{own[-1].lineno} in {own[-1].name}")
    if frames and (not own or frames[-1] is not own[-1]):
        parts.append(f"raised in {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}")
    return "; ".join(parts) or "location unknown"


# -- the transaction guard ----------------------------------------------------------------------

GUARD_TABLE = "backfill_commit_guard"
_RELEASE_SETTING = "backfill.commit_allowed"
_GUARD_MESSAGE = "the batch transaction may only be committed by the backfill engine, together with its checkpoint"
_INSTALL_GUARD = f"""
CREATE TEMP TABLE {GUARD_TABLE} (token text NOT NULL) ON COMMIT DELETE ROWS;
CREATE OR REPLACE FUNCTION pg_temp.{GUARD_TABLE}() RETURNS trigger LANGUAGE plpgsql AS $guard$
BEGIN
    IF current_setting('{_RELEASE_SETTING}', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION '{_GUARD_MESSAGE}';
    END IF;
    RETURN NULL;
END
$guard$;
CREATE CONSTRAINT TRIGGER {GUARD_TABLE} AFTER INSERT ON pg_temp.{GUARD_TABLE}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pg_temp.{GUARD_TABLE}();
"""


def arm_guard(conn: psycopg.Connection) -> str:
    """Inside the batch transaction: make any COMMIT fail until :func:`release_guard`; returns the marker."""
    installed = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"pg_temp.{GUARD_TABLE}"]).fetchone()
    if not (installed and installed[0]):
        conn.execute(_INSTALL_GUARD)  # once per session (rolled back with a failed batch: then again)
    token = token_source.token_hex(8)
    conn.execute(sql.SQL("INSERT INTO pg_temp.{} (token) VALUES (%s)").format(sql.Identifier(GUARD_TABLE)), [token])
    return token


def guard_intact(conn: psycopg.Connection, token: str) -> bool:
    """The batch transaction the guard was armed in is still the open one."""
    if conn.closed or conn.info.transaction_status != TransactionStatus.INTRANS:
        return False
    installed = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"pg_temp.{GUARD_TABLE}"]).fetchone()
    if not (installed and installed[0]):  # created by this batch, and rolled back since
        return False
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM pg_temp.{} WHERE token = %s)").format(sql.Identifier(GUARD_TABLE)), [token]
    ).fetchone()
    return bool(row and row[0])


def release_guard(conn: psycopg.Connection) -> None:
    """The engine's own COMMIT of this transaction may proceed."""
    conn.execute("SELECT set_config(%s, 'on', true)", [_RELEASE_SETTING])


def is_guard_error(error: BaseException) -> bool:
    return isinstance(error, psycopg.Error) and _GUARD_MESSAGE in (error.diag.message_primary or "")


@contextmanager
def owned_transaction(conn: psycopg.Connection) -> Iterator[None]:
    """The batch transaction with ``autocommit`` off: whatever runs after a handler ended the
    transaction itself lands in a new implicit one, rolled back here with the batch."""
    conn.autocommit = False
    try:
        yield
    except BaseException:
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg.Error:  # the connection broke: the server rolls back on its own
                pass
        raise
    else:
        conn.commit()
    finally:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            conn.autocommit = True


# -- runtimes: where handlers run -------------------------------------------------------------


class Runtime(Protocol):
    """Where a handler's batches run: the engine's own psycopg connections (the default) or a
    framework's (a plugin found through :data:`RUNTIMES`), which then also owns the batch transaction."""

    @property
    def connections(self) -> Connections:
        """Opens (and closes) the shards' sessions."""
        ...

    @property
    def dsn(self) -> str:
        """For the engine's other sessions (validation, planning, key probe, failure record, status)."""
        ...

    @property
    def one_shard_per_process(self) -> bool:
        """The framework's connection is per thread: run one shard per process (``--shard``)."""
        ...

    def change(self, target: Target, handler: Handler, shard: int, redact_text: Callable[[str], str]) -> Any:
        """The shard's ``changes.BatchChange``."""
        ...


RUNTIMES = "backfill_operator.handler_runtimes"
"""The entry point group handler runtimes register into (pyproject ``[project.entry-points]``):
the name is the ``spec.handler`` field that selects the runtime (``django``), the value a callable
``(spec, dsn) -> Runtime``. The engine never names a framework's package."""


class RuntimeFactory(Protocol):
    def __call__(self, spec: BackfillSpec, dsn: str | None, /) -> Runtime: ...


def runtime_name(handler: HandlerSpec) -> str | None:
    """The runtime a handler names: the field of ``spec.handler`` besides ``callable`` that is set."""
    names = [name for name in type(handler).model_fields if name != "callable" and getattr(handler, name) is not None]
    return names[0] if names else None


def runtime_for(spec: BackfillSpec, dsn: str | None) -> Runtime | None:
    """The runtime a spec's handler needs (None: the default psycopg connections).

    Loads the plugin registered under :data:`RUNTIMES` only when the manifest names one.
    """
    name = None if spec.handler is None else runtime_name(spec.handler)
    if name is None:
        return None
    found = entry_points(group=RUNTIMES, name=name)
    if not found:
        raise ValidationFailed(
            f"spec.handler.{name}",
            f"no handler runtime {name!r} is installed (entry point group {RUNTIMES}): pip install 'backfill-operator[{name}]'",
        )
    factory: RuntimeFactory = next(iter(found)).load()
    return factory(spec, dsn)
