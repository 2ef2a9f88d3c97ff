"""Handlers on Django's own database connection (``spec.handler.django``).

``django.setup()`` with the manifest's settings module, then every batch of the shard runs on
``connections[alias]``: the engine takes Django's psycopg 3 connection as the shard's session,
the batch transaction is ``transaction.atomic(using=alias)``, and the handler receives a
:class:`DjangoBatch` whose ``queryset`` is the batch (the model's base manager, narrowed to the
key range and the manifest's ``where``, ``select_for_update(no_key=True)``, ordered by pk). So
``save()``, ``bulk_update()`` and every signal receiver's writes commit together with the
checkpoint, or not at all.

Django's connections are per thread: one process runs one shard (``--shard N``; the in-cluster
worker does). The engine's other sessions (key probe, failure record, validation, planning) are
plain psycopg sessions of a DSN built from ``DATABASES[alias]`` unless ``--dsn`` is given.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any

import psycopg
from psycopg import conninfo, pq

from backfill_api.errors import BackfillError, ValidationFailed
from backfill_api.model import BackfillSpec, DjangoHandlerSpec
from backfill_worker.changes.changes import PythonHandler
from backfill_worker.changes.handlers import Batch, Handler, describe_exception
from backfill_worker.sql import session_settings
from backfill_worker.sql.secrets import register_dsn
from backfill_worker.sql.statements import Target

FIELD = "spec.handler.django"


@dataclass(frozen=True)
class DjangoBatch(Batch):
    """A :class:`~backfill_worker.changes.handlers.Batch` with the ORM's view of it."""

    queryset: Any = None
    """The batch's rows as a QuerySet of ``model``: pk range, ``where``, locked, in pk order."""
    model: Any = None
    """The model class (``spec.handler.django.model``)."""

    def objects(self) -> Iterator[Any]:
        """The model instances of :attr:`queryset`, counted like :meth:`rows` (a handler returning None)."""
        for instance in self.queryset:
            self._yielded.rows += 1
            yield instance


def setup(settings_module: str | None) -> None:
    """``django.setup()`` with ``settings_module`` (default ``$DJANGO_SETTINGS_MODULE``); refuses another one."""
    import django
    from django.apps import apps
    from django.conf import settings

    module = settings_module or os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module:
        raise ValidationFailed(
            f"{FIELD}.settingsModule",
            "no Django settings module: set spec.handler.django.settingsModule, DJANGO_SETTINGS_MODULE or --django-settings",
        )
    try:  # first, so a missing module is reported the same whatever this process set up before
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ValidationFailed(
            f"{FIELD}.settingsModule",
            f"cannot import the settings module {module!r}: no module named {error.name!r}; put the project on "
            "PYTHONPATH (e.g. PYTHONPATH=. backfill run ...) or install it in the worker's image",
        ) from None
    except Exception as error:  # noqa: BLE001 - the settings are user code: any exception is the user's to see
        raise ValidationFailed(f"{FIELD}.settingsModule", f"importing {module!r} failed: {describe_exception(error)}") from None
    if settings.configured:
        current = getattr(settings, "SETTINGS_MODULE", None)
        if settings_module is not None and current not in (None, settings_module):
            raise ValidationFailed(
                f"{FIELD}.settingsModule", f"Django is already set up with {current!r} in this process, not {settings_module!r}"
            )
    else:
        os.environ["DJANGO_SETTINGS_MODULE"] = module
    if not apps.ready:
        django.setup()


def dsn_from_settings(alias: str) -> str:
    """A libpq connection string from ``DATABASES[alias]`` (the libpq keywords of Django's connection parameters)."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    try:
        params = connections[alias].get_connection_params()
    except ImproperlyConfigured as error:
        raise ValidationFailed(f"{FIELD}.database", f"DATABASES[{alias!r}]: {error}") from None
    keywords = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    given = {name: str(value) for name, value in params.items() if name in keywords and value not in (None, "")}
    return conninfo.make_conninfo("", **given)


@dataclass(frozen=True)
class DjangoConnections:
    """The shard's session is Django's ``connections[alias]`` (this thread's)."""

    alias: str

    def _wrapper(self) -> Any:
        from django.db import connections

        return connections[self.alias]

    def open(self, application_name: str) -> psycopg.Connection:
        wrapper = self._wrapper()
        if wrapper.in_atomic_block:
            raise ValidationFailed(
                FIELD,
                f"Django's connection {self.alias!r} is inside transaction.atomic() (a migration is atomic unless it sets "
                "atomic = False): the backfill commits every batch itself, so it must run outside any atomic block. "
                "Set atomic = False on the migration, or queue it with backfill_django.operations.QueueBackfill",
            )
        if wrapper.connection is not None and wrapper.connection.closed:
            wrapper.close()  # lost earlier (the engine reconnects): Django would keep the dead session
        wrapper.ensure_connection()
        conn = wrapper.connection
        if not isinstance(conn, psycopg.Connection):
            raise ValidationFailed(FIELD, "Django's connection is not psycopg 3: pip install 'psycopg[binary]>=3.2' (Django >= 4.2 then uses it)")
        conn.execute("SELECT set_config('application_name', %s, false)", [application_name[:63]])
        session_settings.pin(conn)
        # Django's own session time zone (USE_TZ / TIME_ZONE) for its naive datetimes; key values
        # stay exact either way (timestamptz text carries its offset).
        conn.execute("SELECT set_config('TimeZone', %s, false)", [wrapper.timezone_name])
        return conn

    def close(self, conn: psycopg.Connection) -> None:
        wrapper = self._wrapper()
        if wrapper.connection is conn:
            wrapper.close()  # ends the session (and its advisory locks); Django reconnects on next use
        else:
            conn.close()


@dataclass(frozen=True)
class DjangoRuntime:
    """``handlers.Runtime`` for ``spec.handler.django``."""

    connections: DjangoConnections
    dsn: str
    model: Any
    callable_name: str
    where: str | None
    one_shard_per_process: bool = True

    @classmethod
    def from_spec(cls, spec: BackfillSpec, dsn: str | None) -> DjangoRuntime:
        """The ``django`` entry point of ``backfill_operator.handler_runtimes`` (pyproject.toml)."""
        assert spec.handler is not None and spec.handler.django is not None
        try:
            import django  # noqa: F401  (the extra's one dependency: a clear message when it is missing)
        except ImportError:
            raise ValidationFailed(
                FIELD, "Django is not installed: pip install 'backfill-operator[django]' (Django >= 4.2 with psycopg 3)"
            ) from None
        django_spec: DjangoHandlerSpec = spec.handler.django
        setup(django_spec.settings_module)
        from django.apps import apps
        from django.conf import settings

        alias = django_spec.database
        if alias not in settings.DATABASES:
            raise ValidationFailed(f"{FIELD}.database", f"no database {alias!r} in DATABASES (has: {sorted(settings.DATABASES)})")
        if settings.DATABASES[alias].get("OPTIONS", {}).get("pool"):
            raise ValidationFailed(
                f"{FIELD}.database",
                f"DATABASES[{alias!r}] uses a connection pool (OPTIONS['pool']): the backfill holds session advisory locks, "
                "which a pooled session would carry to its next user; use an alias without pool",
            )
        from django.db import connections

        if connections[alias].vendor != "postgresql":
            raise ValidationFailed(f"{FIELD}.database", f"DATABASES[{alias!r}] is {connections[alias].vendor}, not PostgreSQL")
        try:
            model = apps.get_model(django_spec.model)
        except LookupError as error:
            raise ValidationFailed(f"{FIELD}.model", f"{error}; give it as app_label.ModelName") from None
        table = spec.qualified_table
        if model._meta.db_table != table.name:
            raise ValidationFailed(
                "spec.table", f"{django_spec.model}'s table is {model._meta.db_table!r}, but spec.table names {table.name!r}"
            )
        dsn = dsn or dsn_from_settings(alias)
        register_dsn(dsn)  # its password is masked in every log line and message from here on
        return cls(DjangoConnections(alias), dsn, model, spec.handler.callable, spec.where)

    def change(self, target: Target, handler: Handler, shard: int, redact_text: Callable[[str], str]) -> PythonHandler:
        pk = self.model._meta.pk
        if target.key != (pk.column,):
            raise ValidationFailed(
                "spec.key", f"a Django handler walks the model's primary key ({pk.column!r}); the key is {list(target.key)}: omit spec.key"
            )
        return PythonHandler(
            target, handler, self.callable_name, shard, redact_text, open_transaction=self._atomic, decorate=self._decorate
        )

    def _atomic(self, conn: psycopg.Connection) -> AbstractContextManager[object]:
        from django.db import transaction

        if self.connections._wrapper().connection is not conn:
            raise BackfillError("the shard's session is not Django's connection any more (reconnected elsewhere); rerun")
        atomic: AbstractContextManager[object] = transaction.atomic(using=self.connections.alias)
        return atomic

    def _decorate(self, batch: Batch) -> DjangoBatch:
        return DjangoBatch(**{f.name: getattr(batch, f.name) for f in fields(batch)}, queryset=self.queryset(batch), model=self.model)

    def queryset(self, batch: Batch) -> Any:
        """The batch as a QuerySet: ``lower < pk <= upper``, ``where``, locked, in pk order."""
        manager = self.model._base_manager.db_manager(self.connections.alias)
        queryset = manager.filter(pk__lte=batch.upper[0])
        if batch.lower is not None:
            queryset = queryset.filter(pk__gt=batch.lower[0])
        if self.where is not None:
            # Trusted input, as in every statement; own lines so a trailing `-- comment` ends with it;
            # '%' doubled because Django passes parameters (the pk bounds).
            queryset = queryset.extra(where=[f"\n{self.where.replace('%', '%%')}\n"])
        return queryset.select_for_update(no_key=True).order_by("pk")
