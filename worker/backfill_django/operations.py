"""Migration operations in Django's style, after GitLab's queue / ensure-finished pair.

``QueueBackfill`` in a data migration starts the backfill; ``EnsureBackfillSucceeded`` in a
later migration (the one that needs the data, e.g. ``NOT NULL``) makes ``migrate`` fail, with
the phase, the progress and how to wait, until that backfill has Succeeded::

    class Migration(migrations.Migration):
        atomic = False  # required: the backfill commits batch by batch, outside any transaction
        dependencies = [("customers", "0002_customer_status")]
        operations = [QueueBackfill(Path(__file__).with_name("0003_deactivate.yaml"))]

Where it runs (``settings.BACKFILL = {"MODE": ...}``, ``$BACKFILL_MODE`` wins):

* ``local`` (default): ``migrate`` itself runs the backfill to the end, in committed batches on
  sessions of its own (the DSN of the migration's database alias), with the ``backfill run``
  progress bar. Ctrl-C pauses at a batch boundary and fails the migration; ``migrate`` again
  resumes from the checkpoint. Exactly once: a finished backfill is not run again.
* ``cluster``: creates the ``Backfill`` object (kubeconfig from ``settings.BACKFILL["KUBECONFIG"]``,
  ``$KUBECONFIG``, or the in-cluster service account) and returns at once; the operator runs it.
  An existing object with the same change is accepted (``migrate`` may be rerun); one with a
  different change is refused: its checkpoint would not apply.

Both refuse to run inside the migration's transaction (``atomic = False`` is required): the
backfill's own sessions would wait for that transaction's locks (the schema change just made),
and a rollback of the migration could not undo committed batches. Reversing: ``QueueBackfill``
is a no-op backwards (committed rows stay changed, like ``RunPython.noop``; the checkpoint stays,
so re-applying does not change a row twice); ``EnsureBackfillSucceeded`` backwards checks nothing.
Neither is SQL (``reduces_to_sql = False``: ``sqlmigrate`` says so).
Decisions (where to run, what the message says) are pure functions below.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError
from django.db.migrations.operations.base import Operation

from backfill_api.errors import BackfillError, ValidationFailed
from backfill_api.manifest import load_backfill, parse_backfill
from backfill_api.model import Backfill
from backfill_api.status import BackfillStatus, Phase
from backfill_worker.checkpoints.checkpoint import DONE, FAILED, PAUSED, RUNNING, ShardCheckpoint

LOCAL, CLUSTER = "local", "cluster"
MODE_ENV = "BACKFILL_MODE"
FIELD_MANAGER = "backfill-django"
ManifestSource = str | Path | Mapping[str, Any]


class BackfillMigrationError(CommandError):
    """``migrate`` stops with this message (``CommandError``: printed without a traceback)."""


# -- pure decisions -----------------------------------------------------------------------------


def where_to_run(setting: Mapping[str, Any] | None, environ: Mapping[str, str]) -> str:
    """``local`` or ``cluster``: ``$BACKFILL_MODE``, else ``settings.BACKFILL["MODE"]``, else local (PURE)."""
    value = environ.get(MODE_ENV) or (setting or {}).get("MODE") or LOCAL
    if value not in (LOCAL, CLUSTER):
        raise ValidationFailed(
            f"${MODE_ENV} / settings.BACKFILL['MODE']", f"{value!r} is not a mode: use {LOCAL!r} or {CLUSTER!r}"
        )
    return str(value)


def atomic_refusal(description: str) -> str:
    """Why the operation will not run inside the migration's transaction, and the fix (PURE)."""
    return (
        f"{description}: this migration runs in a transaction (Migration.atomic is True, the default), "
        "but a backfill commits batch by batch on its own sessions: they would wait for this transaction's "
        "locks, and rolling the migration back could not undo committed batches. "
        "Add `atomic = False` to the Migration class (put schema changes in a migration of their own before it)"
    )


def _percent(done: int, estimated: int) -> str:
    return f"{min(99, 100 * done // estimated)}%" if estimated > 0 else "?%"


def local_phase(checkpoints: list[ShardCheckpoint]) -> Phase:
    """The phase the shards' checkpoints add up to (PURE): every shard done is Succeeded."""
    if not checkpoints:
        return Phase.PENDING
    states = {cp.state for cp in checkpoints}
    if FAILED in states:
        return Phase.FAILED
    if states == {DONE} and len(checkpoints) >= checkpoints[0].shard_count:
        return Phase.SUCCEEDED
    if RUNNING in states:
        return Phase.RUNNING
    if PAUSED in states:
        return Phase.PAUSED
    return Phase.PENDING


def local_verdict(identity: str, checkpoints: list[ShardCheckpoint], *, fingerprint: str | None,
                  how_to_finish: str) -> str | None:
    """None when the checkpoints say Succeeded, else what ``migrate`` prints (PURE)."""
    if not checkpoints:
        return (
            f"Backfill {identity} has no checkpoint in this database: it never ran here. "
            f"The migration that queues it must run first, or {how_to_finish}"
        )
    if fingerprint is not None and checkpoints[0].fingerprint != fingerprint:
        return (
            f"Backfill {identity}'s checkpoint belongs to a different change than this migration names "
            f"(fingerprint {checkpoints[0].fingerprint}, expected {fingerprint}): check the manifest, "
            "or `backfill reset` it and run it again"
        )
    phase = local_phase(checkpoints)
    if phase is Phase.SUCCEEDED:
        return None
    rows = sum(cp.rows_updated for cp in checkpoints)
    done, estimated = sum(cp.keys_done for cp in checkpoints), sum(cp.estimated_keys for cp in checkpoints)
    text = (
        f"Backfill {identity} has not Succeeded (phase {phase.value}, {_percent(done, estimated)} of the keys, "
        f"{rows:,} rows changed, shards: {', '.join(f'{cp.shard} {cp.state}' for cp in checkpoints)})"
    )
    errors = [f"shard {cp.shard}: {cp.last_error}" for cp in checkpoints if cp.state == FAILED and cp.last_error]
    if errors:
        text += "; " + "; ".join(errors)
    return f"{text}. This migration needs its data: {how_to_finish}, then run `manage.py migrate` again"


def cluster_verdict(namespace: str, name: str, obj: Mapping[str, Any] | None) -> str | None:
    """None when the Backfill object's status is Succeeded, else what ``migrate`` prints (PURE)."""
    wait = (
        f"wait for it (`kubectl -n {namespace} wait backfill/{name} --for=condition=Ready --timeout=24h`), "
        "then run `manage.py migrate` again"
    )
    if obj is None:
        return (
            f"Backfill {namespace}/{name} does not exist in the cluster: the migration that queues it "
            f"(QueueBackfill) has not run against this cluster, or the object was deleted. Queue it, {wait}"
        )
    status = BackfillStatus.parse(obj.get("status"))
    if status.phase is Phase.SUCCEEDED:
        return None
    progress = status.progress
    parts = [f"phase {status.phase.value if status.phase else 'Pending (not picked up by the operator yet)'}"]
    if progress is not None:
        parts.append(f"{progress.percent}%, {progress.rows_updated:,} rows changed")
        if progress.eta:
            parts.append(f"ETA {progress.eta}")
    if status.message:
        parts.append(status.message)
    return f"Backfill {namespace}/{name} has not Succeeded ({'; '.join(parts)}). This migration needs its data: {wait}"


# -- shared plumbing ----------------------------------------------------------------------------


def _backfill_settings() -> Mapping[str, Any]:
    from django.conf import settings

    value = getattr(settings, "BACKFILL", None) or {}
    if not isinstance(value, Mapping):
        raise BackfillMigrationError("settings.BACKFILL: expected a dict such as {'MODE': 'cluster'}")
    return value


def _mode() -> str:
    try:
        return where_to_run(_backfill_settings(), os.environ)
    except ValidationFailed as error:
        raise BackfillMigrationError(str(error)) from None


def _kube_api() -> Any:
    """The cluster's API client (kubeconfig / in-cluster, as ``backfill worker --kubeconfig``)."""
    from backfill_api.kubeapi import KubeApi

    try:
        return KubeApi.from_environment(_backfill_settings().get("KUBECONFIG"))
    except Exception as error:  # noqa: BLE001  (kubernetes' config loader raises several unrelated types)
        raise BackfillMigrationError(
            f"{MODE_ENV}=cluster, but no cluster configuration was found ({type(error).__name__}: {error}): "
            "set settings.BACKFILL['KUBECONFIG'] or $KUBECONFIG, run inside a pod, or use mode 'local'"
        ) from None


def _resolve(path: str | Path) -> Path:
    """Relative manifest paths are relative to ``settings.BASE_DIR`` (else the working directory)."""
    from django.conf import settings

    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    return Path(getattr(settings, "BASE_DIR", None) or Path.cwd()) / candidate


def load_manifest(source: ManifestSource) -> Backfill:
    """A Backfill from a manifest path or a dict (validated by the API model)."""
    if isinstance(source, Mapping):
        return parse_backfill(dict(source), source="QueueBackfill(manifest=...)")
    return load_backfill(_resolve(source))


def _guard(schema_editor: Any, description: str) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        raise BackfillMigrationError(f"{description}: backfills run on PostgreSQL, this database is {connection.vendor}")
    if connection.in_atomic_block:
        raise BackfillMigrationError(atomic_refusal(description))


class _BackfillOperation(Operation):
    reduces_to_sql = False
    reversible = True

    def state_forwards(self, app_label: str, state: Any) -> None:
        """A data change: the model state stays as it is."""

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        """A documented no-op (see the module docstring)."""


# -- the operations -----------------------------------------------------------------------------


class QueueBackfill(_BackfillOperation):
    """Start a Backfill from a migration: in the cluster, or run locally to the end, in batches.

    Either ``manifest``: a path (relative to ``settings.BASE_DIR``) or a dict of the Backfill
    manifest; or ``queryset``: a function of the migration's ``apps`` (as ``RunPython`` gets them)
    returning ``(queryset, update)``, compiled to ``where``/``set`` by Django (``name`` required;
    ``spec`` adds fields such as ``database``, ``batch``, ``limits``). Keep the clock out of a
    QuerySet's literals (``Now() - timedelta(...)``, not ``timezone.now()``): the compiled SQL is
    the change's identity, and a resumed ``migrate`` must compile the same one.
    """

    def __init__(self, manifest: ManifestSource | None = None, *, queryset: Callable[[Any], Any] | None = None,
                 name: str | None = None, namespace: str = "default", spec: Mapping[str, Any] | None = None) -> None:
        if (manifest is None) == (queryset is None):
            raise ValueError("QueueBackfill: give either manifest or queryset")
        if queryset is not None and not name:
            raise ValueError("QueueBackfill(queryset=...): name the Backfill (name=...)")
        self.manifest, self.queryset, self.name, self.namespace = manifest, queryset, name, namespace
        self.spec = dict(spec or {})

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        if self.queryset is None:
            return (type(self).__qualname__, [self.manifest], {})
        kwargs: dict[str, Any] = {"queryset": self.queryset, "name": self.name, "namespace": self.namespace}
        if self.spec:
            kwargs["spec"] = self.spec
        return (type(self).__qualname__, [], kwargs)

    def backfill(self, apps: Any = None) -> Backfill:
        try:
            if self.queryset is not None:
                from .sources import from_result

                assert self.name is not None
                return from_result(self.queryset(apps), name=self.name, namespace=self.namespace, spec=self.spec,
                                   origin="QueueBackfill(queryset=...)")
            assert self.manifest is not None
            return load_manifest(self.manifest)
        except BackfillError as error:
            raise BackfillMigrationError(f"QueueBackfill: {error}") from None

    def describe(self) -> str:
        return f"Queue backfill {self._identity_hint()}"

    def _identity_hint(self) -> str:
        if self.queryset is not None:
            return f"{self.namespace}/{self.name}"
        if isinstance(self.manifest, Mapping):
            meta = self.manifest.get("metadata") or {}
            return f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"
        return f"from {self.manifest}"

    @property
    def migration_name_fragment(self) -> str:
        return "queue_backfill"

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        backfill = self.backfill(from_state.apps)
        description = f"QueueBackfill {backfill.identity}"
        _guard(schema_editor, description)
        if _mode() == CLUSTER:
            queue_in_cluster(backfill)
        else:
            run_locally(backfill, schema_editor.connection.alias)


def queue_in_cluster(backfill: Backfill) -> None:
    """Create the Backfill object; an existing one must describe the same change (same fingerprint)."""
    from backfill_api.kubeapi import KubeApiError, backfill_path

    api = _kube_api()
    namespace, name = backfill.metadata.namespace, backfill.metadata.name
    body = backfill.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"status"})
    try:
        try:
            api.create(backfill_path(namespace), body)
            print(f"  Backfill {namespace}/{name} created in the cluster: the operator runs it")
            return
        except KubeApiError as error:
            if error.status != 409:
                raise
        existing = parse_backfill(api.get(backfill_path(namespace, name)), source=f"Backfill {namespace}/{name}")
        if existing.spec.fingerprint() != backfill.spec.fingerprint():
            raise BackfillMigrationError(
                f"QueueBackfill {namespace}/{name}: a Backfill of that name already exists in the cluster with a "
                "different change (table, key, set/handler, where or parallelism differ): give this backfill a new "
                "name, or delete the old one once it is no longer needed"
            )
        print(f"  Backfill {namespace}/{name} already exists in the cluster with this change: left as it is")
    except KubeApiError as error:
        raise BackfillMigrationError(f"QueueBackfill {namespace}/{name}: {error}") from None
    finally:
        api.close()


def run_locally(backfill: Backfill, alias: str) -> None:
    """Run the backfill to the end here, exactly as ``backfill run`` does (its progress bar and summary)."""
    from backfill_cli.app import RowsAtStart, configure, execute, out, print_report
    from backfill_worker.sql.secrets import REDACTOR

    from .database import dsn_for

    configure()  # the CLI's logging: warnings only, redacted, on stderr
    dsn = dsn_for(alias)
    start = RowsAtStart()
    try:
        report = execute(backfill, dsn, shards=None, json_progress=False, store=None,
                         description=backfill.identity, start=start)
    except BackfillError as error:
        raise BackfillMigrationError(
            f"QueueBackfill {backfill.identity} failed; nothing of the failed batch was committed and "
            f"`manage.py migrate` resumes from the checkpoint once the cause is fixed: {REDACTOR.redact(str(error))}"
        ) from None
    print_report(report, out, rows_before=start.rows)
    if report.state != DONE:
        raise BackfillMigrationError(
            f"QueueBackfill {backfill.identity} stopped ({report.state}) after {report.rows_updated:,} rows: "
            "run `manage.py migrate` again to resume from the checkpoint"
        )


class EnsureBackfillSucceeded(_BackfillOperation):
    """Fail ``migrate`` until the named Backfill has Succeeded (cluster: its status; local: its checkpoint).

    Name it with ``manifest`` (the one QueueBackfill ran; its change is checked too) or with
    ``name`` and ``namespace`` (and ``checkpoint_schema`` when the manifest sets one).
    """

    def __init__(self, name: str | None = None, namespace: str = "default", *, manifest: ManifestSource | None = None,
                 checkpoint_schema: str = "backfill") -> None:
        if (name is None) == (manifest is None):
            raise ValueError("EnsureBackfillSucceeded: give either name (and namespace) or manifest")
        self.name, self.namespace, self.manifest, self.checkpoint_schema = name, namespace, manifest, checkpoint_schema

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        kwargs: dict[str, Any] = {"manifest": self.manifest} if self.manifest is not None else {
            "name": self.name, "namespace": self.namespace}
        if self.checkpoint_schema != "backfill":
            kwargs["checkpoint_schema"] = self.checkpoint_schema
        return (type(self).__qualname__, [], kwargs)

    def describe(self) -> str:
        return f"Ensure backfill {self.name or self.manifest} has succeeded"

    @property
    def migration_name_fragment(self) -> str:
        return "ensure_backfill_succeeded"

    def _target(self) -> tuple[str, str, str, str | None]:
        """namespace, name, checkpoint schema, fingerprint (when a manifest says what the change is)."""
        if self.manifest is None:
            assert self.name is not None
            return self.namespace, self.name, self.checkpoint_schema, None
        try:
            backfill = load_manifest(self.manifest)
        except BackfillError as error:
            raise BackfillMigrationError(f"EnsureBackfillSucceeded: {error}") from None
        meta = backfill.metadata
        return meta.namespace, meta.name, backfill.spec.checkpoint.schema_name, backfill.spec.fingerprint()

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        namespace, name, schema, fingerprint = self._target()
        if _mode() == CLUSTER:
            problem = cluster_verdict(namespace, name, _read_object(namespace, name))
        else:
            finish = (f"finish it with `manage.py backfill run {self.manifest}` (resumes from the checkpoint)"
                      if self.manifest is not None and not isinstance(self.manifest, Mapping)
                      else "finish it with `manage.py backfill run <its manifest>` (resumes from the checkpoint)")
            checkpoints = _read_checkpoints(schema_editor.connection.alias, schema, f"{namespace}/{name}")
            problem = local_verdict(f"{namespace}/{name}", checkpoints, fingerprint=fingerprint, how_to_finish=finish)
        if problem is not None:
            raise BackfillMigrationError(problem)


def _read_object(namespace: str, name: str) -> dict[str, Any] | None:
    from backfill_api.kubeapi import KubeApiError, backfill_path

    api = _kube_api()
    try:
        return api.get(backfill_path(namespace, name))  # type: ignore[no-any-return]
    except KubeApiError as error:
        if error.status == 404:
            return None
        raise BackfillMigrationError(f"EnsureBackfillSucceeded {namespace}/{name}: {error}") from None
    finally:
        api.close()


def _read_checkpoints(alias: str, schema: str, identity: str) -> list[ShardCheckpoint]:
    """The checkpoint rows, on a session of its own (the migration's may be inside its transaction)."""
    from backfill_worker.checkpoints.checkpoint import CheckpointTable
    from backfill_worker.sql.connection import connect, database_errors

    from .database import dsn_for

    dsn = dsn_for(alias)
    try:
        with connect(dsn, f"backfill {identity} migrate check") as conn, database_errors(dsn):
            return CheckpointTable(schema).load(conn, identity)
    except BackfillError as error:
        raise BackfillMigrationError(f"EnsureBackfillSucceeded {identity}: {error}") from None

