"""What ``kubectl backfill`` shows and decides (PURE: dicts in, rows, strings and exit codes out).

Everything here reads the objects the API server returns (a Backfill, its Events, its worker
pods, log lines) and is tested without a cluster; ``app.py`` does the I/O and the printing.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from backfill_api.status import BackfillStatus, Phase, ShardState, ShardStatus, ThrottleReason, format_eta
from backfill_worker.sql.secrets import redact, secrets_of


class Exit(IntEnum):
    """Exit codes of ``status`` and ``wait`` (and of every command's errors), for CI gates."""

    SUCCEEDED = 0
    FAILED = 1
    """The Backfill is Failed (``wait``/``status``), or another error talking to the API."""
    USAGE = 2
    """Bad command line (typer/click's own code)."""
    TIMEOUT = 3
    """``wait --timeout`` (or ``status -w --timeout``) ran out before the awaited phase."""
    NOT_FOUND = 4
    """No such Backfill (or manifest file) in that namespace."""
    FORBIDDEN = 5
    """The API server refused (403): the message says which verb on which resource."""
    NO_CLUSTER = 6
    """No kubeconfig / context, or the API server cannot be reached, or the credentials were refused."""
    IN_PROGRESS = 7
    """``status``: Pending or Running (or not yet observed by the operator)."""
    PAUSED = 8
    """``status``: Paused (``spec.suspend: true``)."""
    OTHER_END = 9
    """``wait --for X``: the Backfill ended in another phase and will never reach X (e.g. Succeeded)."""


EXIT_CODES_HELP = (
    "Exit codes: 0 Succeeded (or the awaited phase reached), 1 Failed, 2 usage, 3 timeout, "
    "4 not found, 5 forbidden (RBAC), 6 no cluster/unreachable/unauthorized, "
    "7 Pending or Running, 8 Paused, 9 ended in another phase than awaited."
)

TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)


def observed_phase(backfill: Mapping[str, Any]) -> Phase | None:
    """``status.phase`` once the operator has seen the current spec, else None (a stale phase
    right after ``pause``/``resume``/``retry`` must not end a ``wait``)."""
    status = BackfillStatus.parse(backfill.get("status"))
    generation = (backfill.get("metadata") or {}).get("generation")
    if status.phase is None:
        return None
    if generation is not None and (status.observed_generation or 0) < int(generation):
        return None
    return status.phase


def phase_exit(phase: Phase | None) -> Exit:
    """``status``'s exit code for a phase."""
    if phase is Phase.SUCCEEDED:
        return Exit.SUCCEEDED
    if phase is Phase.FAILED:
        return Exit.FAILED
    if phase is Phase.PAUSED:
        return Exit.PAUSED
    return Exit.IN_PROGRESS


def wait_outcome(backfill: Mapping[str, Any], target: Phase) -> Exit | None:
    """``wait --for target``: the exit code once decided, None to keep waiting."""
    phase = observed_phase(backfill)
    if phase is None:
        return None
    if phase is target:
        return Exit.SUCCEEDED
    if phase is Phase.FAILED:
        return Exit.FAILED
    if phase is Phase.SUCCEEDED:
        return Exit.OTHER_END
    return None


# -- retry ------------------------------------------------------------------------------------


def retry_refusal(backfill: Mapping[str, Any]) -> str | None:
    """Why ``retry`` does not apply, or None when the Backfill is Failed and may be retried."""
    phase = BackfillStatus.parse(backfill.get("status")).phase
    if phase is Phase.FAILED:
        return None
    name = (backfill.get("metadata") or {}).get("name", "")
    if phase is Phase.PAUSED:
        return f"Backfill {name} is Paused, not Failed: use `kubectl backfill resume {name}`"
    return f"Backfill {name} is {phase.value if phase else 'not yet reconciled'}, not Failed: nothing to retry"


# -- durations and ages -------------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: Any, now: datetime) -> str:
    """``kubectl``'s short age (``45s``, ``3m``, ``2h``, ``4d``); ``-`` when unknown."""
    when = parse_time(value)
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:  # as kubectl: 119s, then 2m ... 119m, then 2h
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- list -------------------------------------------------------------------------------------

LIST_COLUMNS = ("NAME", "PHASE", "PROGRESS", "ROWS", "RATE", "ETA", "SHARDS", "THROTTLE", "AGE", "MESSAGE")


def _parallelism(backfill: Mapping[str, Any]) -> int:
    value = (backfill.get("spec") or {}).get("parallelism") or 1
    return int(value) if str(value).isdigit() else 1


def list_rows(backfills: Iterable[Mapping[str, Any]], now: datetime, *, namespaces: bool = False) -> list[list[str]]:
    """``kubectl backfill list``: one row per Backfill (a NAMESPACE column first with ``-A``)."""
    rows = []
    for item in sorted(backfills, key=lambda b: ((b.get("metadata") or {}).get("namespace", ""), (b.get("metadata") or {}).get("name", ""))):
        meta = item.get("metadata") or {}
        status = BackfillStatus.parse(item.get("status"))
        progress = status.progress
        parallelism = _parallelism(item)
        done = sum(1 for i in range(parallelism) if status.shard(i).state == ShardState.DONE)
        row = [
            str(meta.get("name", "")),
            status.phase.value if status.phase else "-",
            f"{progress.percent}%" if progress else "-",
            str(progress.rows_updated) if progress else "0",
            f"{progress.rows_per_second:g}/s" if progress and progress.rows_per_second else "-",
            (progress.eta or "-") if progress else "-",
            f"{done}/{parallelism}",
            (progress.throttle_reason or "-") if progress else "-",
            age(meta.get("creationTimestamp"), now),
            status.message,
        ]
        rows.append([str(meta.get("namespace", "")), *row] if namespaces else row)
    return rows


# -- status: shards, throttle, events, pods ---------------------------------------------------

SHARD_COLUMNS = ("SHARD", "STATE", "DONE", "KEYS (done/est.)", "LAST KEY", "ROWS", "BATCHES", "BATCH", "RATE", "ETA", "THROTTLE", "RUN", "LAST ERROR")

THROTTLE_WHY: dict[str, str] = {
    ThrottleReason.PAUSE: "spec.batch.pause: the configured pause after each batch",
    ThrottleReason.MAX_ROWS_PER_SECOND: "spec.limits.maxRowsPerSecond: holding the rate at its cap",
    ThrottleReason.REPLICATION_LAG: "spec.limits.maxReplicationLag: a replica lags more than allowed",
    ThrottleReason.APPLICATION_IMPACT: "spec.limits.applicationImpact: pausing so the application keeps its throughput and latency",
    ThrottleReason.HEALTH_QUERY: "spec.limits.health.query says unhealthy (or failed)",
    ThrottleReason.WAL_RATE: "spec.limits.maxWalBytesPerSecond: the server writes WAL faster than allowed",
    ThrottleReason.ACTIVE_BACKENDS: "spec.limits.maxActiveBackends: too many active sessions on the server",
    ThrottleReason.LOCK_WAITS: "spec.limits.maxLockWaits: sessions are waiting on locks",
    ThrottleReason.WINDOW: "spec.schedule: outside every run window",
}


def _key(last_key: Sequence[str] | None) -> str:
    if not last_key:
        return "-"
    text = ",".join(last_key)
    return text if len(text) <= 24 else text[:23] + "…"


def shard_rows(status: BackfillStatus, parallelism: int) -> list[list[str]]:
    """One row per shard, from ``status.shards`` (a shard that has not reported shows as pending).

    The key range's bounds live in the database checkpoint, not in the status: the row shows how
    far through its range the shard is (keys done of estimated, the last key committed)."""
    rows = []
    indexes = sorted({*range(parallelism), *(int(k) for k in status.shards if k.isdigit())})
    for index in indexes:
        shard = status.shard(index)
        rows.append([
            str(index),
            shard.state.value if shard.state else "pending",
            f"{100 if shard.state == ShardState.DONE else shard.percent}%",
            f"{shard.keys_done}/{shard.estimated_keys}" if shard.estimated_keys else "-",
            _key(shard.last_key),
            str(shard.rows_updated),
            str(shard.batches),
            str(shard.batch_size or "-"),
            f"{shard.rows_per_second:g}/s" if shard.rows_per_second else "-",
            format_eta(shard.eta_seconds) or "-",
            shard.throttle_reason or "-",
            str(shard.run) if shard.run is not None else "-",
            shard.last_error or "-",
        ])
    return rows


def _waited(shard: ShardStatus) -> str:
    parts = [f"{reason} {format_eta(seconds) or '0s'}" for reason, seconds in sorted(shard.throttled_seconds.items()) if seconds >= 1]
    return f" (this run waited: {', '.join(parts)})" if parts else ""


def throttle_lines(status: BackfillStatus, parallelism: int) -> list[str]:
    """What the throttle is doing and why, per running shard, with the application-impact state."""
    lines = []
    for index in range(max(parallelism, len(status.shards))):
        shard = status.shard(index)
        if shard.state != ShardState.RUNNING:
            continue
        reason = shard.throttle_reason
        if reason:
            why = THROTTLE_WHY.get(reason, reason)
            opens = f"; the next window opens at {shard.next_window_start}" if shard.next_window_start else ""
            lines.append(f"shard {index}: waiting — {why}{opens}{_waited(shard)}")
        else:
            lines.append(f"shard {index}: not waiting (batch size {shard.batch_size or '-'}){_waited(shard)}")
        impact = shard.impact
        if impact is not None:
            held = f"limited by {impact.limited_by}" if impact.limited_by else "no signal over its budget"
            ratio = f", throughput ratio {impact.throughput_ratio:.2f}" if impact.throughput_ratio is not None else ""
            app = "application writing" if impact.application_present else "no application writes seen"
            lines.append(
                f"  application impact: {impact.summary or '-'}; {held}; pressure {impact.pressure:.2f}{ratio}; "
                f"pause {impact.pause_ms:.0f} ms after batches of {impact.batch_target_ms:.0f} ms target; {app}"
            )
    return lines


EVENT_COLUMNS = ("LAST SEEN", "TYPE", "REASON", "COUNT", "MESSAGE")


def event_time(event: Mapping[str, Any]) -> str:
    series = event.get("series") or {}
    return str(event.get("lastTimestamp") or series.get("lastObservedTime") or event.get("eventTime")
               or (event.get("metadata") or {}).get("creationTimestamp") or "")


def last_events(events: Iterable[Mapping[str, Any]], limit: int = 10) -> list[Mapping[str, Any]]:
    """The ``limit`` most recent Events, oldest first (as ``kubectl describe`` lists them)."""
    ordered = sorted(events, key=_event_order)
    return ordered[-limit:] if limit else ordered


def _event_order(event: Mapping[str, Any]) -> tuple[datetime, int]:
    """By time (whole seconds in most Events), then by the etcd revision that stored it."""
    version = str((event.get("metadata") or {}).get("resourceVersion") or "")
    return parse_time(event_time(event)) or datetime.min.replace(tzinfo=UTC), int(version) if version.isdigit() else 0


def event_rows(events: Iterable[Mapping[str, Any]], now: datetime, limit: int = 10) -> list[list[str]]:
    return [
        [age(event_time(e), now), str(e.get("type", "")), str(e.get("reason", "")), str(e.get("count") or 1), str(e.get("message", ""))]
        for e in last_events(events, limit)
    ]


POD_COLUMNS = ("POD", "SHARD", "RUN", "PHASE", "CONTAINER", "RESTARTS", "NODE", "AGE")

LABEL_SHARD = "backfill.dev/shard"
LABEL_RUN = "backfill.dev/run"


def container_state(pod: Mapping[str, Any]) -> str:
    """The first container's state as ``kubectl describe`` words it: running, waiting (reason),
    terminated (reason, exit code)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    if not statuses:
        return "-"
    state = statuses[0].get("state") or {}
    if "running" in state:
        return "running"
    if "waiting" in state:
        return f"waiting: {(state['waiting'] or {}).get('reason', '')}".rstrip(": ")
    if "terminated" in state:
        ended = state["terminated"] or {}
        return f"terminated: {ended.get('reason', '')} (exit {ended.get('exitCode', '?')})"
    return "-"


def pod_sort_key(pod: Mapping[str, Any]) -> tuple[int, int, str]:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    shard, run = str(labels.get(LABEL_SHARD, "")), str(labels.get(LABEL_RUN, ""))
    return (int(shard) if shard.isdigit() else -1, int(run) if run.isdigit() else -1, str((pod.get("metadata") or {}).get("name", "")))


def pod_rows(pods: Iterable[Mapping[str, Any]], now: datetime) -> list[list[str]]:
    rows = []
    for pod in sorted(pods, key=pod_sort_key):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        labels = meta.get("labels") or {}
        restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
        phase = str(status.get("phase", "-")) + (" (terminating)" if meta.get("deletionTimestamp") else "")
        rows.append([
            str(meta.get("name", "")), str(labels.get(LABEL_SHARD, "-")), str(labels.get(LABEL_RUN, "-")), phase,
            container_state(pod), str(restarts), str((pod.get("spec") or {}).get("nodeName") or "-"),
            age(meta.get("creationTimestamp"), now),
        ])
    return rows


def status_document(
    backfill: Mapping[str, Any], events: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], limit: int = 10
) -> dict[str, Any]:
    """``status -o json|yaml``: the Backfill's status with its Events, worker pods and exit code."""
    meta = backfill.get("metadata") or {}
    status = BackfillStatus.parse(backfill.get("status"))
    phase = observed_phase(backfill)
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "phase": status.phase.value if status.phase else None,
        "observed": phase is not None,
        "exitCode": int(phase_exit(phase)),
        "message": status.message,
        "suspend": bool((backfill.get("spec") or {}).get("suspend")),
        "status": backfill.get("status") or {},
        "throttle": throttle_lines(status, _parallelism(backfill)),
        "events": [
            {"time": event_time(e), "type": e.get("type"), "reason": e.get("reason"), "count": e.get("count") or 1,
             "message": e.get("message")}
            for e in last_events(events, limit)
        ],
        "pods": [
            {"name": r[0], "shard": r[1], "run": r[2], "phase": r[3], "container": r[4], "restarts": int(r[5]), "node": r[6]}
            for r in pod_rows(pods, datetime.now(UTC))
        ],
    }


def summary_lines(backfill: Mapping[str, Any]) -> list[str]:
    """The header of ``status``: name, phase (and whether the operator has seen the spec), progress."""
    meta = backfill.get("metadata") or {}
    status = BackfillStatus.parse(backfill.get("status"))
    spec = backfill.get("spec") or {}
    phase = status.phase.value if status.phase else "(not reconciled yet)"
    lag = "" if observed_phase(backfill) is not None or status.phase is None else " (the operator has not seen the latest spec yet)"
    lines = [
        f"Backfill {meta.get('namespace')}/{meta.get('name')}: {phase}{lag}",
        f"  table {spec.get('table', '-')}, parallelism {_parallelism(backfill)}, run {status.run}"
        + (", suspend: true" if spec.get("suspend") else ""),
    ]
    if status.message:
        lines.append(f"  {status.message}")
    progress = status.progress
    if progress is not None:
        rate = f", {progress.rows_per_second:g} rows/s" if progress.rows_per_second else ""
        eta = f", ETA {progress.eta}" if progress.eta else ""
        lines.append(f"  progress {progress.percent}%: {progress.rows_updated} rows in {progress.batches} batches{rate}{eta}")
    stall = status.condition("Stalled")
    if stall is not None and stall.status == "True":
        lines.append(f"  Stalled: {stall.reason}: {stall.message}")
    return lines


# -- logs -------------------------------------------------------------------------------------

_TIMESTAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) (.*)$", re.DOTALL)


@dataclass(frozen=True)
class LogLine:
    time: datetime | None
    prefix: str
    text: str

    def render(self) -> str:
        return f"{self.prefix} {self.text}"


def shard_prefix(pod: Mapping[str, Any]) -> str:
    """``[shard 0 run 2]``: which worker wrote a line (the pod's labels the operator sets)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return f"[shard {labels.get(LABEL_SHARD, '?')} run {labels.get(LABEL_RUN, '?')}]"


def parse_log_line(line: str, prefix: str) -> LogLine:
    """A line of ``GET pods/<name>/log?timestamps=true``: the kubelet's RFC 3339 stamp, then the text."""
    match = _TIMESTAMPED.match(line)
    if match is None:
        return LogLine(None, prefix, line)
    stamp = match.group(1)
    # Python < 3.11 aside, fromisoformat takes at most 6 fractional digits: the kubelet sends 9.
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp)
    return LogLine(parse_time(stamp), prefix, match.group(2))


def merge_logs(streams: Mapping[str, Sequence[str]]) -> list[LogLine]:
    """The lines of several pods (prefix -> timestamped lines) in time order; a line without a
    stamp keeps its place after the line before it in its own stream."""
    parsed: list[list[tuple[datetime, int, LogLine]]] = []
    floor = datetime.min.replace(tzinfo=UTC)
    for order, (prefix, lines) in enumerate(streams.items()):
        last = floor
        stream = []
        for line in lines:
            entry = parse_log_line(line, prefix)
            last = entry.time or last
            stream.append((last, order, entry))
        parsed.append(stream)
    return [entry for _, _, entry in heapq.merge(*parsed, key=lambda item: (item[0], item[1]))]


def select_shard(pods: Iterable[Mapping[str, Any]], shard: int | None) -> list[Mapping[str, Any]]:
    chosen = [p for p in pods if shard is None or ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_SHARD) == str(shard)]
    return sorted(chosen, key=pod_sort_key)


# -- API errors ---------------------------------------------------------------------------------

_FORBIDDEN = re.compile(
    r'cannot (?P<verb>\w+) resource "(?P<resource>[^"]+)"(?: in API group "(?P<group>[^"]*)")?'
    r'(?: in the namespace "(?P<namespace>[^"]+)")?'
)
_USER = re.compile(r'User "(?P<user>[^"]+)"')


def describe_forbidden(verb: str, resource: str, namespace: str | None, api_message: str) -> str:
    """A 403 as the user needs it: which verb on which resource, where, as whom, and the fix.

    The API server's message names them (``User "x" cannot list resource "pods" in API group ""
    in the namespace "shop"``); what it does not say comes from the request we made."""
    match = _FORBIDDEN.search(api_message)
    user_match = _USER.search(api_message)
    if match:
        verb, group = match.group("verb"), match.group("group") or ""
        resource = match.group("resource") + (f".{group}" if group else "")
        namespace = match.group("namespace") or namespace
    where = f' in namespace "{namespace}"' if namespace else " (cluster-wide)"
    who = f' as "{user_match.group("user")}"' if user_match else ""
    return (f"permission denied: cannot {verb} {resource}{where}{who}; "
            f"ask for a Role{'Binding' if namespace else ''} granting \"{verb}\" on \"{resource}\"")


# -- redaction ----------------------------------------------------------------------------------


def redact_all(text: str, secrets: Iterable[str]) -> str:
    """Every known secret value masked, and anything shaped like a DSN password (the engine's rule)."""
    return redact(text, [s for s in secrets if s])


def secret_values(secret: Mapping[str, Any]) -> list[str]:
    """Every value of a Secret (``data`` base64-decoded, and ``stringData``), and inside each DSN
    the password: what a report must never contain."""
    values: list[str] = []
    for raw in (secret.get("data") or {}).values():
        try:
            values.append(base64.b64decode(str(raw)).decode(errors="replace"))
        except (ValueError, binascii.Error):
            continue
    values += [str(v) for v in (secret.get("stringData") or {}).values()]
    found: list[str] = []
    for value in values:
        found += secrets_of(value.strip()) if value.strip() else []
        found.append(value)
    return [v for v in found if len(v) >= 3]
