"""``kubectl backfill``: the kubectl plugin (console script ``kubectl-backfill``).

``list``, ``status``, ``pause``, ``resume``, ``retry``, ``wait``, ``logs``, ``plan``, ``report``
and ``version``, each honouring ``--kubeconfig``, ``--context`` and ``-n/--namespace`` (``-A`` for
``list``) as kubectl does. What to show and decide is in ``view.py``, ``plan_pod.py`` and
``report.py`` (pure); this module does the API calls (``kube.py``) and the printing.
"""

from __future__ import annotations

import io
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backfill_api.durations import parse_duration
from backfill_api.errors import BackfillError
from backfill_api.manifest import describe_validation_error, load_backfill
from backfill_api.manifest_yaml import load_documents
from backfill_api.status import BackfillStatus, Phase

from . import plan_pod, report, view
from .kube import Cluster, PluginError, connect
from .view import EXIT_CODES_HELP, Exit

app = typer.Typer(
    name="kubectl backfill",
    rich_markup_mode=None,
    help="kubectl plugin for Backfill resources (backfill.dev): status, pause/resume/retry, wait, logs, plan, report.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Off a terminal (CI logs, pipes, grep) rich would assume 80 columns and fold table cells across
# lines: tables get their natural width there instead, as kubectl prints them.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)

KubeconfigOption = Annotated[str | None, typer.Option("--kubeconfig", help="Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).")]
ContextOption = Annotated[str | None, typer.Option("--context", help="The kubeconfig context to use (default: its current-context).")]
NamespaceOption = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace of the Backfill (default: the context's).")]
NameArgument = Annotated[str, typer.Argument(help="Name of the Backfill.")]
TimeoutOption = Annotated[str, typer.Option("--timeout", help="Give up after this long (e.g. 90s, 10m, 1h; 0: wait forever).")]
POLL_SECONDS = 2.0


@dataclass
class Session:
    cluster: Cluster
    namespace: str


@contextmanager
def session(kubeconfig: str | None, context: str | None, namespace: str | None) -> Iterator[Session]:
    """A connection, and every error as a message with its exit code (no traceback)."""
    cluster: Cluster | None = None
    try:
        api, default_namespace = connect(kubeconfig, context)
        cluster = Cluster(api)
        yield Session(cluster, namespace or default_namespace)
    except PluginError as error:
        err.print(f"[bold red]error:[/] {escape(str(error))}", markup=True)
        raise typer.Exit(int(error.code)) from None
    finally:
        if cluster is not None:
            cluster.close()


def _seconds(timeout: str) -> float | None:
    """``--timeout``: a duration (``90s``, ``10m``) or bare seconds; 0 means no limit."""
    text = timeout.strip()
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text).total_seconds()
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--timeout") from None
    return seconds or None


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """kubectl's layout: columns apart, at their natural width, no trailing blanks (plain text:
    rendered on its own console, so that it nests inside ``report``'s capture of the status)."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style=None)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console = Console(file=io.StringIO(), width=10_000, highlight=False, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())  # type: ignore[attr-defined]


def _now() -> datetime:
    return datetime.now(UTC)


# -- list / status ------------------------------------------------------------------------------


@app.command("list")
def list_(
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Backfills of every namespace.")] = False,
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """The Backfills (kubectl get bf, plus shards done and the active throttle)."""
    with session(kubeconfig, context, namespace) as s:
        items = s.cluster.backfills(None if all_namespaces else s.namespace)
    if not items:
        err.print("No Backfills found" + ("." if all_namespaces else f' in namespace "{s.namespace}".'))
        return
    columns = (("NAMESPACE",) if all_namespaces else ()) + view.LIST_COLUMNS
    out.print(_table(columns, view.list_rows(items, _now(), namespaces=all_namespaces)), markup=False)


def _render_status(backfill: Mapping[str, Any], events: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
                   output: str, limit: int) -> str | None:
    """Print the status in ``output`` form; text form is printed directly (returns None)."""
    if output in ("json", "yaml"):
        document = view.status_document(backfill, events, pods, limit)
        return json.dumps(document, indent=2) if output == "json" else yaml.safe_dump(document, sort_keys=False)
    status = BackfillStatus.parse(backfill.get("status"))
    parallelism = int((backfill.get("spec") or {}).get("parallelism") or 1)
    now = _now()
    for line in view.summary_lines(backfill):
        out.print(escape(line))
    out.print()
    out.print("[bold]Shards[/]")
    out.print(_table(view.SHARD_COLUMNS, view.shard_rows(status, parallelism)), markup=False)
    throttle = view.throttle_lines(status, parallelism)
    if throttle:
        out.print()
        out.print("[bold]Throttle[/]")
        for line in throttle:
            out.print(escape(line))
    out.print()
    out.print("[bold]Worker pods[/]")
    rows = view.pod_rows(pods, now)
    out.print(_table(view.POD_COLUMNS, rows) if rows else "  (none)", markup=False)
    out.print()
    out.print(f"[bold]Events[/] (last {limit})")
    event_rows = view.event_rows(events, now, limit)
    out.print(_table(view.EVENT_COLUMNS, event_rows) if event_rows else "  (none)", markup=False)
    return None


def _gather(s: Session, name: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    backfill = s.cluster.backfill(s.namespace, name)
    return backfill, s.cluster.events(s.namespace, name), s.cluster.worker_pods(s.namespace, name)


@app.command(epilog="Exit codes: 0 Succeeded, 1 Failed, 3 timeout (-w --timeout), 4 not found, 5 forbidden, "
             "6 no cluster, 7 Pending or Running, 8 Paused. With -w it returns once the phase is Succeeded or Failed.")
def status(
    name: NameArgument,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the Backfill is Succeeded or Failed.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="text, yaml or json.")] = "text",
    events: Annotated[int, typer.Option("--events", min=0, help="How many of the last Events to show.")] = 10,
    timeout: TimeoutOption = "0",
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """Phase, per-shard progress, what the throttle does and why, worker pods and the last Events."""
    if output not in ("text", "yaml", "json"):
        raise typer.BadParameter("use text, yaml or json", param_hint="--output")
    limit = _seconds(timeout)
    with session(kubeconfig, context, namespace) as s:
        deadline = time.monotonic() + limit if limit else None
        shown = ""
        while True:
            backfill, found_events, pods = _gather(s, name)
            phase = view.observed_phase(backfill)
            if output == "text":
                fingerprint = json.dumps([backfill.get("status"), [e.get("count") for e in found_events], [p.get("status") for p in pods]],
                                         sort_keys=True, default=str)
                if fingerprint != shown:
                    if shown:
                        out.print(f"--- {_now().strftime('%H:%M:%S')} ---")
                    _render_status(backfill, found_events, pods, output, events)
                    shown = fingerprint
            else:
                text = _render_status(backfill, found_events, pods, output, events) or ""
                if text != shown:
                    out.print(text, markup=False)
                    shown = text
            if not watch or phase in view.TERMINAL:
                raise typer.Exit(int(view.phase_exit(phase)))
            if deadline is not None and time.monotonic() > deadline:
                err.print(f"timed out: Backfill {name} is {phase.value if phase else 'not reconciled'}")
                raise typer.Exit(int(Exit.TIMEOUT))
            time.sleep(POLL_SECONDS)


# -- pause / resume / retry / wait --------------------------------------------------------------


def _set_suspend(s: Session, name: str, suspend: bool) -> None:
    backfill = s.cluster.backfill(s.namespace, name)
    current = bool((backfill.get("spec") or {}).get("suspend"))
    if current == suspend:
        out.print(f"Backfill {s.namespace}/{name}: spec.suspend is already {str(suspend).lower()}; nothing changed")
        return
    s.cluster.patch_spec(s.namespace, name, {"suspend": suspend})
    if suspend:
        out.print(f"Backfill {s.namespace}/{name}: spec.suspend set to true; the workers stop at the next batch boundary "
                  f"(kubectl backfill wait {name} --for paused)")
    else:
        out.print(f"Backfill {s.namespace}/{name}: spec.suspend set to false; the next run resumes from the checkpoint")


@app.command()
def pause(name: NameArgument, namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None) -> None:
    """Stop at the next batch boundary (sets spec.suspend: true; lossless: the checkpoint is kept)."""
    with session(kubeconfig, context, namespace) as s:
        _set_suspend(s, name, True)


@app.command()
def resume(name: NameArgument, namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None) -> None:
    """Continue from the checkpoint (sets spec.suspend: false)."""
    with session(kubeconfig, context, namespace) as s:
        _set_suspend(s, name, False)


def _poll(s: Session, name: str, decide: Callable[[dict[str, Any]], Exit | None], limit: float | None) -> tuple[Exit, dict[str, Any]]:
    """Read the Backfill every POLL_SECONDS until ``decide`` says; TIMEOUT after ``limit`` seconds."""
    deadline = time.monotonic() + limit if limit else None
    while True:
        backfill = s.cluster.backfill(s.namespace, name)
        outcome = decide(backfill)
        if outcome is not None:
            return outcome, backfill
        if deadline is not None and time.monotonic() > deadline:
            return Exit.TIMEOUT, backfill
        time.sleep(POLL_SECONDS if deadline is None else max(0.05, min(POLL_SECONDS, deadline - time.monotonic())))


@app.command(epilog="What it changes: spec.suspend goes true, then (once the operator reports Paused and has deleted the "
             "failed Jobs) back to false. The spec ends as it was; status.run increases by one.")
def retry(
    name: NameArgument, timeout: TimeoutOption = "2m",
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """Run a Failed Backfill again from its checkpoint (what the operator offers: suspend, then resume)."""
    limit = _seconds(timeout)
    with session(kubeconfig, context, namespace) as s:
        backfill = s.cluster.backfill(s.namespace, name)
        refusal = view.retry_refusal(backfill)
        if refusal is not None:
            err.print(f"[bold red]error:[/] {escape(refusal)}", markup=True)
            raise typer.Exit(int(Exit.FAILED))
        failed_run = BackfillStatus.parse(backfill.get("status")).run
        s.cluster.patch_spec(s.namespace, name, {"suspend": True})
        outcome, _ = _poll(s, name, lambda b: view.wait_outcome(b, Phase.PAUSED), limit)
        s.cluster.patch_spec(s.namespace, name, {"suspend": False})
        if outcome is not Exit.SUCCEEDED:
            err.print(f"[bold red]error:[/] the operator did not report Backfill {name} Paused within {timeout}: is it running? "
                      "spec.suspend is false again (as before); the Backfill is still Failed", markup=True)
            raise typer.Exit(int(Exit.TIMEOUT))
        out.print(f"Backfill {s.namespace}/{name}: retrying from the checkpoint (run {failed_run + 1} next; "
                  "spec.suspend went true and back to false, nothing else in the spec changed)")


WAIT_TARGETS = {p.value.lower(): p for p in Phase}


@app.command(epilog="Exit codes: 0 the phase was reached, 1 Failed (when waiting for another phase), 3 timeout, "
             "4 not found, 5 forbidden, 6 no cluster, 9 ended in another phase (e.g. Succeeded while waiting for failed).")
def wait(
    name: NameArgument,
    for_: Annotated[str, typer.Option("--for", help="succeeded, failed, paused, running or pending.")] = "succeeded",
    timeout: TimeoutOption = "10m",
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """Wait until the Backfill reaches a phase (the operator must have seen the current spec)."""
    target = WAIT_TARGETS.get(for_.lower())
    if target is None:
        raise typer.BadParameter(f"use one of: {', '.join(WAIT_TARGETS)}", param_hint="--for")
    limit = _seconds(timeout)
    with session(kubeconfig, context, namespace) as s:
        outcome, backfill = _poll(s, name, lambda b: view.wait_outcome(b, target), limit)
    status = BackfillStatus.parse(backfill.get("status"))
    phase = status.phase.value if status.phase else "not reconciled"
    if outcome is Exit.SUCCEEDED:
        out.print(f"Backfill {s.namespace}/{name} is {phase}")
    elif outcome is Exit.TIMEOUT:
        err.print(f"timed out after {timeout} waiting for Backfill {name} to be {target.value}: it is {phase}")
    else:
        err.print(f"Backfill {name} is {phase} and will not become {target.value}: {escape(status.message)}")
    raise typer.Exit(int(outcome))


# -- logs -------------------------------------------------------------------------------------


def _started(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any("running" in (c.get("state") or {}) or "terminated" in (c.get("state") or {}) for c in statuses)


def _follow(s: Session, name: str, shard: int | None, tail: int | None) -> None:
    """Stream every worker pod's log as it is written; pods of later runs join when they start.
    Ends when the Backfill is Succeeded or Failed and the streams are over, or on Ctrl-C."""
    lines: queue.Queue[str] = queue.Queue()
    followed: dict[str, threading.Thread] = {}
    first = True

    def pump(pod: Mapping[str, Any], from_tail: int | None) -> None:
        prefix = view.shard_prefix(pod)
        try:
            for line in s.cluster.follow(s.namespace, pod["metadata"]["name"], tail=from_tail):
                lines.put(view.parse_log_line(line, prefix).render())
        except PluginError as error:
            lines.put(f"{prefix} (log unavailable: {error})")

    while True:
        pods = [p for p in view.select_shard(s.cluster.worker_pods(s.namespace, name), shard) if _started(p)]
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            if pod_name not in followed:
                thread = threading.Thread(target=pump, args=(pod, tail if first else None), daemon=True)
                followed[pod_name] = thread
                thread.start()
        first = False
        deadline = time.monotonic() + POLL_SECONDS
        while time.monotonic() < deadline:
            try:
                out.print(lines.get(timeout=0.2), markup=False)
            except queue.Empty:
                pass
        if view.observed_phase(s.cluster.backfill(s.namespace, name)) in view.TERMINAL and not any(t.is_alive() for t in followed.values()):
            while not lines.empty():
                out.print(lines.get(), markup=False)
            return


@app.command()
def logs(
    name: NameArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming (new runs' pods join) until the Backfill ends.")] = False,
    shard: Annotated[int | None, typer.Option("--shard", min=0, help="Only this shard's workers.")] = None,
    tail: Annotated[int | None, typer.Option("--tail", min=0, help="Lines per pod from the end (default: all).")] = None,
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """The worker pods' logs, merged in time order, each line prefixed with its shard and run."""
    with session(kubeconfig, context, namespace) as s:
        s.cluster.backfill(s.namespace, name)  # a clear "not found" before anything else
        if follow:
            try:
                _follow(s, name, shard, tail)
            except KeyboardInterrupt:
                pass
            return
        pods = [p for p in view.select_shard(s.cluster.worker_pods(s.namespace, name), shard) if _started(p)]
        if not pods:
            err.print(f"no worker pod of Backfill {name} has started" + (f" for shard {shard}" if shard is not None else ""))
            raise typer.Exit(int(Exit.NOT_FOUND))
        streams: dict[str, list[str]] = {}
        for pod in pods:
            prefix = view.shard_prefix(pod)
            key = prefix if prefix not in streams else f"{prefix} {pod['metadata']['name']}"
            streams[key] = s.cluster.logs(s.namespace, pod["metadata"]["name"], tail=tail).splitlines()
        for line in view.merge_logs(streams):
            out.print(line.render(), markup=False)


# -- plan -------------------------------------------------------------------------------------


def _manifest_from_file(path: Path, namespace: str | None, default_namespace: str) -> dict[str, Any]:
    """The file's Backfill, validated as strictly as ``backfill plan`` will (nothing created before)."""
    model = load_backfill(path)  # raises ManifestError naming each field
    document = next(d for d in load_documents(path.read_text(encoding="utf-8")) if isinstance(d, dict) and d.get("kind", "Backfill") == "Backfill")
    ns = namespace or (document.get("metadata") or {}).get("namespace") or default_namespace
    return plan_pod.plan_manifest(model.metadata.name, str(ns), document.get("spec") or {})


def run_plan_pod(s: Session, manifest: Mapping[str, Any], image: str | None, limit: float | None,
                 emit: Callable[[str], None]) -> int:
    """Create the plan pod, wait for it, ``emit`` its output, delete it; the plan's exit code."""
    name = str(manifest["metadata"]["name"])
    jobs = s.cluster.jobs(s.namespace, name)
    newest = max(jobs, key=lambda j: int(((j.get("metadata") or {}).get("labels") or {}).get("backfill.dev/run", "0") or 0), default=None)
    try:
        pod = plan_pod.render_plan_pod(manifest, defaults=plan_pod.defaults_from_job(newest, image),
                                       deadline_seconds=int(limit or 600))
    except ValidationError as error:
        raise PluginError("the Backfill's spec is not valid:\n" + "\n".join(f"  - spec.{p}" for p in describe_validation_error(error)),
                          Exit.USAGE) from None
    except ValueError as error:  # no spec.database.dsnSecretRef
        raise PluginError(str(error), Exit.USAGE) from None
    pod_name = pod["metadata"]["name"]
    s.cluster.create_pod(s.namespace, pod)
    try:
        deadline = time.monotonic() + (limit or 600)
        while True:
            current = s.cluster.pod(s.namespace, pod_name)
            over, code, why = plan_pod.pod_outcome(current)
            if over:
                break
            if time.monotonic() > deadline:
                raise PluginError(f"timed out: plan pod {pod_name} did not finish (phase {(current.get('status') or {}).get('phase')}); "
                                  f"`kubectl describe pod {pod_name}` while it exists says why", Exit.TIMEOUT)
            time.sleep(1.0)
        if code is None:
            raise PluginError(f"the plan pod {pod_name} could not run: {why}", Exit.FAILED)
        emit(s.cluster.logs(s.namespace, pod_name, timestamps=False))
        return code
    finally:
        s.cluster.delete_pod(s.namespace, pod_name)


@app.command(epilog="Exit code: that of `backfill plan` in the pod (0 plan OK, 1 plan check failed, 2 invalid manifest "
             "or validation failed, 4 cannot connect), or 3 timeout, 4 not found, 5 forbidden, 6 no cluster.")
def plan(
    target: Annotated[str, typer.Argument(help="A Backfill manifest file, or the name of a Backfill in the cluster.")],
    image: Annotated[str | None, typer.Option("--image", help="Image to run (default: spec.worker.image, else the image of "
                                                               "the Backfill's newest worker Job, else the operator's default).")] = None,
    timeout: TimeoutOption = "5m",
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """`backfill plan` in the cluster, where the DSN is: a short-lived pod with the Backfill's image,
    Secret and worker service account; prints the plan and deletes the pod. Writes nothing to the database."""
    limit = _seconds(timeout)
    path = Path(target)
    with session(kubeconfig, context, namespace) as s:
        if path.is_file():
            try:
                manifest = _manifest_from_file(path, namespace, s.namespace)
            except BackfillError as error:
                raise PluginError(str(error), Exit.USAGE) from None
            s.namespace = str(manifest["metadata"]["namespace"])
        elif path.suffix in (".yaml", ".yml", ".json") or "/" in target:
            raise PluginError(f"no such manifest file: {target}", Exit.NOT_FOUND)
        else:
            backfill = s.cluster.backfill(s.namespace, target)
            meta = backfill.get("metadata") or {}
            manifest = plan_pod.plan_manifest(target, s.namespace, backfill.get("spec") or {}, meta.get("annotations") or {})
        code = run_plan_pod(s, manifest, image, limit, lambda text: out.print(text, markup=False, end=""))
    raise typer.Exit(code)


# -- report / version ---------------------------------------------------------------------------


def plugin_version() -> str:
    try:
        return metadata.version("backfill-operator")
    except metadata.PackageNotFoundError:
        return "unknown"


def _attempt(problems: list[str], what: str, fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except PluginError as error:
        problems.append(f"{what}: {error}")
        return default


@app.command(name="report")
def report_(
    name: NameArgument,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Archive path (default: backfill-report-NS-NAME-TIME.tar.gz).")] = None,
    operator_namespace: Annotated[str, typer.Option("--operator-namespace", help="Where the operator runs.")] = "backfill-system",
    tail: Annotated[int, typer.Option("--tail", min=1, help="Log lines per pod.")] = 5000,
    with_plan: Annotated[bool, typer.Option("--plan/--no-plan", help="Also run the plan in the cluster (starts a pod).")] = False,
    namespace: NamespaceOption = None, kubeconfig: KubeconfigOption = None, context: ContextOption = None,
) -> None:
    """One tar.gz for a bug report: spec, status, Events, Jobs, pods, worker and operator logs, versions
    (and the plan with --plan). The DSN and every value of its Secret are redacted."""
    with session(kubeconfig, context, namespace) as s:
        backfill = s.cluster.backfill(s.namespace, name)
        problems: list[str] = []
        events = _attempt(problems, "events", lambda: s.cluster.events(s.namespace, name), [])
        pods = _attempt(problems, "worker pods", lambda: s.cluster.worker_pods(s.namespace, name), [])
        jobs = _attempt(problems, "worker jobs", lambda: s.cluster.jobs(s.namespace, name), [])
        def pod_logs(pods: Sequence[Mapping[str, Any]], in_namespace: str) -> dict[str, str]:
            return {
                p["metadata"]["name"]: _attempt(problems, f"log of {p['metadata']['name']}",
                                                partial(s.cluster.logs, in_namespace, p["metadata"]["name"], tail=tail), "")
                for p in pods if _started(p)
            }

        worker_logs = pod_logs(pods, s.namespace)
        operators = _attempt(problems, f"operator pods in {operator_namespace}",
                             lambda: s.cluster.pods_by_label(operator_namespace, {"app.kubernetes.io/name": "backfill-operator"}), [])
        if not operators and not any(p.startswith("operator pods") for p in problems):
            problems.append(f"operator pods: none labelled app.kubernetes.io/name=backfill-operator in {operator_namespace} "
                            "(pass --operator-namespace)")
        operator_logs = pod_logs(operators, operator_namespace)
        server = _attempt(problems, "server version", s.cluster.version, {})
        images = sorted({c.get("image", "") for p in [*pods, *operators] for c in (p.get("spec") or {}).get("containers") or []})
        versions = {"plugin": plugin_version(), "server": server, "images": images, "python": sys.version.split()[0]}
        secrets: list[str] = []
        ref = ((backfill.get("spec") or {}).get("database") or {}).get("dsnSecretRef") or {}
        if ref.get("name"):
            secret = s.cluster.secret(s.namespace, str(ref["name"]))
            if secret is None:
                problems.append(f"Secret {ref['name']} not readable: DSN passwords are masked by pattern only")
            else:
                secrets = view.secret_values(secret)
        plan_text: str | None = None
        if with_plan:
            meta = backfill.get("metadata") or {}
            manifest = plan_pod.plan_manifest(name, s.namespace, backfill.get("spec") or {}, meta.get("annotations") or {})
            chunks: list[str] = []
            try:
                code = run_plan_pod(s, manifest, None, 300, chunks.append)
                plan_text = "".join(chunks) + f"\n(exit code {code})\n"
            except PluginError as error:
                problems.append(f"plan: {error}")
        with out.capture() as captured:
            _render_status(backfill, events, pods, "text", 20)
        collected = report.Collected(
            backfill=backfill, status_text=captured.get(), events=events, jobs=jobs, pods=pods, worker_logs=worker_logs,
            operator_logs=operator_logs, versions=versions, plan=plan_text, problems=problems,
        )
        files = report.report_files(collected, secrets)
    destination = output or Path(f"backfill-report-{s.namespace}-{name}-{_now().strftime('%Y%m%dT%H%M%SZ')}.tar.gz")
    with destination.open("wb") as handle:
        report.write_archive(files, handle)
    out.print(f"wrote {destination} ({len(files)} files; secrets redacted)")
    for problem in problems:
        err.print(f"  not collected: {escape(problem)}")


@app.command()
def version(kubeconfig: KubeconfigOption = None, context: ContextOption = None) -> None:
    """The plugin's version and the API server's."""
    out.print(f"kubectl-backfill {plugin_version()}")
    with session(kubeconfig, context, None) as s:
        server = s.cluster.version()
    out.print(f"server {server.get('gitVersion', '?')}")


def main() -> None:
    """Console-script entry point (``kubectl-backfill``; kubectl runs it for ``kubectl backfill``)."""
    app()
