"""The ``backfill`` command line: run, plan, status, reset and demo a Backfill manifest locally.

Exit codes: 0 done or paused, 1 failed, 2 invalid manifest / validation, 3 already running,
4 connection failed (see ``backfill_api/errors.py``); ``plan --strict``: 5 when the plan warns. Nothing printed ever contains the DSN or password:
errors are ``BackfillError`` messages (redacted at the source) or redacted here.

Other commands (``crd``, ``worker``, ``operator``) register themselves at the end of this file;
process-wide setup (logging, metrics) happens in :func:`configure`, called by the callback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backfill_api.errors import BackfillError, ValidationFailed
from backfill_api.manifest import load_backfill
from backfill_api.model import Backfill, CheckpointMode, Walk
from backfill_api.status import ShardState, format_eta
from backfill_worker.checkpoints import checkpoint_guard
from backfill_worker.checkpoints.checkpoint import JsonFileStore, ShardCheckpoint
from backfill_worker.observe.events import Event, Listener, RunStarted, StaticControl
from backfill_worker.plan.plan_warnings import wal_and_vacuum_lines
from backfill_worker.plan.planner import Plan, plan_backfill
from backfill_worker.run.engine import RunReport, read_checkpoints, reset_checkpoints, run_backfill
from backfill_worker.run.signals import stop_on_signals
from backfill_worker.sql.secrets import REDACTOR

app = typer.Typer(
    name="backfill",
    # Plain click help: the rich panels print a type after every flag (`--help <bool>`) and
    # squeeze the help text into a narrow column.
    rich_markup_mode=None,
    help="Run large PostgreSQL data backfills as keyset-batched, committed, throttled, restart-safe UPDATEs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a message is never cut or hard-wrapped at 80 columns when the output is not a
# terminal (CI logs, pipes); the terminal wraps it instead.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DsnOption = Annotated[
    str | None,
    typer.Option("--dsn", envvar="BACKFILL_DSN", show_envvar=True, show_default=False,
                 help="libpq connection string or URI of the target database (never printed)."),
]
FileArgument = Annotated[Path, typer.Argument(help="Backfill manifest (YAML), the same you would kubectl apply.")]
DjangoSettingsOption = Annotated[
    str | None,
    typer.Option("--django-settings", envvar="DJANGO_SETTINGS_MODULE", show_envvar=True, show_default=False,
                 help="Django settings module for a spec.handler.django manifest (its DATABASES give the DSN when --dsn is not given)."),
]
StateDirOption = Annotated[
    Path, typer.Option("--state-dir", help="Where checkpoint.mode: atLeastOnce keeps progress (a JSON file per backfill).")
]


def configure(*, verbose: bool = False, log_format: str = "text", log_level: str | None = None,
              metrics_port: int | None = None) -> None:
    """The one place process-wide output is set up: logging and the worker's /metrics endpoint."""
    from backfill_worker.observe.logs import LOG_FORMATS, configure_logging

    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"use one of: {', '.join(LOG_FORMATS)}", param_hint="--log-format")
    # Logs go to stderr; the progress bar and summaries to stdout. Warnings only, unless -v.
    configure_logging(log_format, log_level or ("INFO" if verbose else "WARNING"))
    if metrics_port is not None:
        from backfill_worker.observe.worker_metrics import start_process_metrics

        start_process_metrics(metrics_port)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log engine events (stderr).")] = False,
    log_format: Annotated[str, typer.Option("--log-format", envvar="BACKFILL_LOG_FORMAT",
                                            help="Log lines as 'text' or 'json' (one object per line).")] = "text",
    log_level: Annotated[str | None, typer.Option("--log-level", envvar="BACKFILL_LOG_LEVEL",
                                                     help="DEBUG, INFO, WARNING or ERROR (default: WARNING, INFO with -v).")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", envvar="BACKFILL_METRICS_PORT", min=0, max=65535,
                                                        help="Serve engine metrics for Prometheus on this port (/metrics).")] = None,
) -> None:
    configure(verbose=verbose, log_format=log_format, log_level=log_level, metrics_port=metrics_port)


# -- helpers ------------------------------------------------------------------------------------


def fail(error: BaseException) -> NoReturn:
    """Print ``error`` without secrets and exit with its documented code."""
    if isinstance(error, BackfillError):
        message, code = str(error), error.exit_code
    else:
        message, code = f"unexpected {type(error).__name__}: {error}", 1
    # escape(): messages quote user input ('[/b]', regex classes) that rich would eat or choke on.
    err.print(f"[bold red]error:[/] {escape(REDACTOR.redact(message))}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except (BackfillError, Exception) as error:  # noqa: BLE001  (everything leaves redacted)
        fail(error)


def _require_dsn(dsn: str | None) -> str:
    if not dsn:
        fail(ValidationFailed("--dsn", "no database given: pass --dsn or set the BACKFILL_DSN environment variable"))
    return dsn


def _dsn_for(backfill: Backfill, dsn: str | None, django_settings: str | None = None) -> str:
    """``--dsn``; for a ``spec.handler.django`` manifest without it, Django's ``DATABASES``."""
    from backfill_worker.changes.handlers import runtime_for, runtime_name

    handler = backfill.spec.handler
    if handler is None or runtime_name(handler) is None:
        return _require_dsn(dsn)
    import os


    if django_settings:
        os.environ["DJANGO_SETTINGS_MODULE"] = django_settings
    runtime = runtime_for(backfill.spec, dsn)
    assert runtime is not None
    return runtime.dsn


def _store(backfill: Backfill, state_dir: Path) -> JsonFileStore | None:
    if backfill.spec.checkpoint.mode == CheckpointMode.AT_LEAST_ONCE:
        return JsonFileStore(state_dir, backfill.identity)
    return None


def print_wide(console: Console, table: Table) -> None:
    """A table at its natural width: off a terminal rich assumes 80 columns and would wrap cells
    (timestamps, key ranges) across lines; the terminal soft-wraps a long line instead."""
    needed = console.measure(table, options=console.options.update(max_width=10_000)).maximum
    previous = console.width
    console.width = max(previous, needed)  # print(width=) can only narrow
    try:
        console.print(table)
    finally:
        console.width = previous


class RowsAtStart:
    """Engine listener: the rows each shard's checkpoint already counted when this run started."""

    def __init__(self) -> None:
        self.by_shard: dict[int, int] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.by_shard.setdefault(event.shard, event.rows_updated)

    @property
    def rows(self) -> int:
        return sum(self.by_shard.values())


def summary_line(report: RunReport, rows_before: int = 0) -> str:
    """The machine-readable last line of ``run``: totals, and this run's own rate (PURE).

    ``rows_updated`` counts every run of this backfill (the checkpoint's total); the rate divides
    only the rows of this run by this run's seconds, so a resumed run does not look faster.
    """
    this_run = max(0, report.rows_updated - rows_before)
    rate = this_run / report.duration if report.duration > 0 else 0.0
    remaining = "-" if report.remaining_matches is None else report.remaining_matches
    return (
        f"state={report.state} rows_updated={report.rows_updated} rows_this_run={this_run} "
        f"batches={report.batches} remaining_matches={remaining} "
        f"seconds={report.duration:.2f} rows_per_second={rate:.0f}"
    )


def print_report(report: RunReport, console: Console, *, rows_before: int = 0) -> None:
    table = Table(title=f"Backfill {report.state}", show_edge=False)
    for column in ("shard", "state", "rows updated", "batches", "still matching where", "seconds"):
        table.add_column(column, justify="right" if column not in ("state",) else "left")
    for s in report.shards:
        remaining = "-" if s.remaining_matches is None else f"{s.remaining_matches:,}"
        table.add_row(str(s.shard), s.state, f"{s.rows_updated:,}", f"{s.batches:,}", remaining, f"{s.duration:.1f}")
    print_wide(console, table)
    if rows_before:
        console.print(f"resumed: {rows_before:,} rows were already updated by earlier runs")
    console.print(summary_line(report, rows_before), markup=False)


def execute(backfill: Backfill, dsn: str, *, shards: list[int] | None, json_progress: bool,
            store: JsonFileStore | None, description: str, start: RowsAtStart | None = None) -> RunReport:
    """Run ``backfill`` as ``backfill run`` does: logs, metrics, stop on signals, progress bar or JSON
    lines (``manage.py migrate``'s ``QueueBackfill`` runs through it too)."""
    from backfill_worker.observe.logs import LogListener, bind_backfill
    from backfill_worker.observe.worker_metrics import process_listener

    from .progress import JsonProgress, ProgressBar

    control = StaticControl()
    bind_backfill(backfill.identity)
    listeners: list[Listener] = [LogListener(), *([start] if start is not None else [])]
    if (metrics := process_listener()) is not None:
        listeners.append(metrics)
    announce = lambda text: err.print(f"[yellow]{text}[/]")  # noqa: E731
    with stop_on_signals(control, announce):
        if json_progress:
            listeners.append(JsonProgress(sys.stdout))
            return run_backfill(backfill, dsn, shards=shards, listeners=listeners, control=control, at_least_once_store=store)
        with ProgressBar(out, description) as bar:
            listeners.append(bar)
            return run_backfill(backfill, dsn, shards=shards, listeners=listeners, control=control, at_least_once_store=store)


# -- commands -----------------------------------------------------------------------------------


@app.command()
def run(
    file: FileArgument,
    dsn: DsnOption = None,
    shard: Annotated[list[int] | None, typer.Option("--shard", help="Run only this shard (repeatable).")] = None,
    state_dir: StateDirOption = Path(".backfill-state"),
    json_progress: Annotated[bool, typer.Option("--json-progress", help="One JSON line per engine event instead of a progress bar.")] = False,
    django_settings: DjangoSettingsOption = None,
) -> None:
    """Run the backfill to completion (resumable: rerun after a stop or crash continues)."""
    with user_errors():
        backfill = load_backfill(file)
        dsn = _dsn_for(backfill, dsn, django_settings)
        if backfill.spec.dry_run:  # spec.dryRun: plan only, write nothing
            result = plan_backfill(backfill, dsn)
            print_plan(result, out)
            err.print("spec.dryRun is true: planned only, nothing was changed")
            raise typer.Exit(0 if result.ok else 1)
        start = RowsAtStart()
        store = _store(backfill, state_dir)
        if store is None:  # transactional: an atLeastOnce progress file means the mode was switched
            checkpoint_guard.refuse_file_progress(JsonFileStore(state_dir, backfill.identity), backfill)
        report = execute(backfill, dsn, shards=shard, json_progress=json_progress,
                          store=store, description=backfill.identity, start=start)
        if not json_progress:
            print_report(report, out, rows_before=start.rows)
        if report.state == ShardState.PAUSED:
            err.print("paused: rerun the same command to continue from the checkpoint")
        raise typer.Exit(1 if report.state == ShardState.FAILED else 0)


def estimate_lines(plan: Plan) -> list[str]:
    """What ``plan`` knows about the size of the job, saying where each number comes from (PURE)."""
    if plan.by_ctid:
        lines = [f"blocks in range: {plan.estimated_keys:,} (walk: ctid; the table's size now, fixed at the start)"
                 f"   shards: {plan.parallelism}"]
    else:
        lines = [f"keys in range: ~{plan.estimated_keys:,} (an estimate: table statistics, or a count for small tables)"
                 f"   shards: {plan.parallelism}"]
    sample = plan.sample
    if sample is not None and sample.keys > 0:
        by_sample = round(plan.estimated_keys * sample.rows / sample.keys)
        lines.append(
            f"rows to change: ~{by_sample:,} by the sample batch's ratio ({sample.rows:,} of its "
            f"{sample.keys:,} {'blocks' if plan.by_ctid else 'keys'} matched; the first ones may not be typical)"
        )
    lines.append(
        f"rows to change, the query planner's guess: ~{plan.estimated_rows_to_change:,} "
        "(from table statistics; far off if the table was never ANALYZEd)"
    )
    return lines


def print_plan(plan: Plan, console: Console) -> None:
    console.print(f"[bold]Backfill[/] {plan.identity} on {plan.table}")
    key = ", ".join(f"{c} {t}" for c, t in zip(plan.key, plan.key_types, strict=False)) if plan.key_types else ", ".join(plan.key)
    if plan.by_ctid:
        console.print("walk: ctid (batches are ranges of physical blocks, read by TID Range Scans)")
    else:
        console.print(f"key: ({key}) via unique index {plan.key_index}")
    for line in estimate_lines(plan):
        console.print(line, markup=False)
    for name, text in plan.statements.items():
        console.print(f"\n[bold]{name} statement[/] (per batch):")
        console.print(text, markup=False, soft_wrap=True)
    serves = "a TID Range Scan must serve every batch" if plan.by_ctid else "the key index must serve every batch statement"
    console.print(f"\n[bold]plan check[/] ({serves}):")
    for check in plan.index_checks:
        if check.uses_index:
            verdict = "[green]ok[/]"
        elif check.ok:
            verdict = "[green]ok[/] (a small table, or one batch covers all of it: a scan of it is right)"
        else:
            verdict = "[red]NOT A TID RANGE SCAN[/]" if plan.by_ctid else "[red]NOT USING THE KEY INDEX[/]"
        console.print(f"  {check.statement:<7} {'generic' if check.generic else 'custom ':<8} {verdict}  {'; '.join(check.scans)}")
    if plan.sample is not None:
        s = plan.sample
        console.print(
            f"\nsample batch (rolled back): {s.keys:,} {'blocks' if plan.by_ctid else 'keys'}, {s.rows:,} rows changed, "
            f"{s.seconds * 1000:.1f} ms"
        )
    if plan.projected_seconds is not None:
        console.print(f"projected duration at batch size {plan.sample.batch_size if plan.sample else '-'}: ~{format_eta(plan.projected_seconds) or '0s'} (an estimate, before adaptive sizing)")
    if plan.estimate is not None:
        for line in wal_and_vacuum_lines(plan.estimate, plan.vacuum):
            console.print(line + " (an estimate from the sample batch)", markup=False)
    print_warnings(plan, console)
    if plan.duplicate_matches:
        console.print(
            f"[red]JOIN MATCHES SEVERAL ROWS[/]: {plan.duplicate_matches:,} target rows of the sample batch match more than "
            "one row of spec.from; UPDATE ... FROM would use an arbitrary one. Make spec.from's condition match one row per target row"
        )
    console.print(f"plan_ok={'true' if plan.ok else 'false'}")
    console.print(f"plan_warnings={','.join(w.code for w in plan.warnings) or '-'}", markup=False)


def print_warnings(plan: Plan, console: Console) -> None:
    if not plan.warnings:
        console.print("\nwarnings: none")
        return
    console.print(f"\n[bold yellow]warnings[/] ({len(plan.warnings)}):")
    for warning in plan.warnings:
        console.print(f"  [yellow]{warning.code}[/]: {escape(warning.message)}")
        console.print(f"    measured: {warning.measurement}", markup=False)
        console.print(f"    fix: {warning.fix}", markup=False)


PLAN_WARNINGS_EXIT = 5
"""``backfill plan --strict``: the plan is sound (index check passed) but warns."""


def plan_exit_code(plan: Plan, *, strict: bool) -> int:
    """1 when a batch statement would not use the key index (or a join matches twice); with
    ``strict``, ``PLAN_WARNINGS_EXIT`` when there is any warning; else 0 (PURE)."""
    if not plan.ok:
        return 1
    return PLAN_WARNINGS_EXIT if strict and plan.warnings else 0


@app.command()
def plan(file: FileArgument, dsn: DsnOption = None, django_settings: DjangoSettingsOption = None,
         strict: Annotated[bool, typer.Option("--strict", help=f"Exit {PLAN_WARNINGS_EXIT} when the plan warns (a CI gate).")] = False) -> None:
    """Dry run: key, estimates, the exact SQL, the index check, warnings and a timed, rolled-back sample batch."""
    with user_errors():
        backfill = load_backfill(file)
        result = plan_backfill(backfill, _dsn_for(backfill, dsn, django_settings))
        print_plan(result, out)
        raise typer.Exit(plan_exit_code(result, strict=strict))


def print_checkpoints(backfill: Backfill, checkpoints: list[ShardCheckpoint], console: Console) -> None:
    if not checkpoints:
        console.print(f"{backfill.identity}: no checkpoint (never ran, or reset)")
        return
    table = Table(title=f"{backfill.identity} checkpoint", show_edge=False)
    by_ctid = backfill.spec.walk is Walk.CTID  # keys are block numbers: (lo, hi] means blocks lo..hi-1
    columns = ("blocks done", "next block", "blocks") if by_ctid else ("keys done", "last key", "range")
    for column in ("shard", "state", "rows updated", "batches", *columns, "updated"):
        table.add_column(column)
    for cp in checkpoints:
        lower = ("0" if by_ctid else "start") if cp.lower_key is None else ",".join(cp.lower_key)
        upper = "-" if cp.upper_key is None else ",".join(cp.upper_key)
        table.add_row(
            str(cp.shard), cp.state, f"{cp.rows_updated:,}", f"{cp.batches:,}",
            f"{cp.keys_done:,}/{cp.estimated_keys:,}", "-" if cp.last_key is None else ",".join(cp.last_key),
            f"[{lower}, {upper})" if by_ctid else f"({lower}, {upper}]",
            cp.updated_at.isoformat(timespec="seconds") if cp.updated_at else "-",
        )
    print_wide(console, table)
    for cp in checkpoints:
        if cp.state == ShardState.FAILED:
            console.print(f"shard {cp.shard} failed: {cp.last_error or '(no reason recorded)'}", markup=False)
    if checkpoints[0].fingerprint != backfill.spec.fingerprint():
        console.print("[red]the checkpoint belongs to a different spec: `backfill reset` to start over[/]")


@app.command()
def status(file: FileArgument, dsn: DsnOption = None, state_dir: StateDirOption = Path(".backfill-state"),
           django_settings: DjangoSettingsOption = None) -> None:
    """Show the checkpoint of every shard."""
    with user_errors():
        backfill = load_backfill(file)
        store = _store(backfill, state_dir)
        checkpoints = read_checkpoints(backfill, _dsn_for(backfill, dsn, django_settings) if store is None else (dsn or ""), store=store)
        print_checkpoints(backfill, checkpoints, out)


@app.command()
def reset(file: FileArgument, dsn: DsnOption = None, state_dir: StateDirOption = Path(".backfill-state"),
          django_settings: DjangoSettingsOption = None) -> None:
    """Forget the checkpoint, so the next run starts from the first key (rows already changed stay changed)."""
    with user_errors():
        backfill = load_backfill(file)
        removed = reset_checkpoints(backfill, _dsn_for(backfill, dsn, django_settings), store=_store(backfill, state_dir))
        out.print(f"{backfill.identity}: removed {removed} checkpoint row(s)")


@app.command()
def demo(
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows in the demo customers table.")] = 1_000_000,
    json_progress: Annotated[bool, typer.Option("--json-progress")] = False,
) -> None:
    """Start a throwaway PostgreSQL, create the customers table, run the example backfill, verify, stop."""
    import yaml

    from backfill_cli.demo import (
        DEMO_MANIFEST,
        changed_rows,
        demo_backfill,
        matching_rows,
        seed_customers,
    )
    from backfill_cli.localpg import LocalPostgres

    with user_errors():
        out.print("[bold]Starting a throwaway PostgreSQL[/] ...")
        with LocalPostgres() as server:
            import psycopg

            dsn = server.dsn()
            started = time.monotonic()
            with psycopg.connect(dsn, autocommit=True) as conn:
                seed_customers(conn, rows)
                before = matching_rows(conn)
            out.print(f"Created public.customers with {rows:,} rows in {time.monotonic() - started:.1f} s; "
                      f"{before:,} match the backfill's where.")
            out.print("\n[bold]Manifest[/]:")
            out.print(yaml.safe_dump(DEMO_MANIFEST, sort_keys=False), markup=False)
            backfill = demo_backfill()
            report = execute(backfill, dsn, shards=None, json_progress=json_progress, store=None,
                              description="customers-inactive")
            print_report(report, out)
            with psycopg.connect(dsn, autocommit=True) as conn:
                changed, after = changed_rows(conn), matching_rows(conn)
            ok = report.state == ShardState.DONE and changed == before and after == 0
            out.print(
                f"verification: {changed:,} rows now 'inactive' (expected {before:,}), {after:,} still matching: "
                + ("[green]OK[/]" if ok else "[red]MISMATCH[/]")
            )
            if report.state == ShardState.PAUSED:
                raise typer.Exit(0)
            raise typer.Exit(0 if ok else 1)


# -- commands contributed by other modules (crd, worker, operator) register below ---------------

from backfill_cli.cluster import register as _register_kubernetes_commands  # noqa: E402

_register_kubernetes_commands(app)  # backfill crd | worker | operator
