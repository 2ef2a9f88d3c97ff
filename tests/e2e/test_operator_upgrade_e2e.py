"""A rolling upgrade of the chart during 50 running Backfills, on the real kubelet (issue 21).

``helm upgrade`` with a changed image tag (the same image under a second tag on the node: there
is no registry) while every Backfill's worker is mid-run. Asserted: the rollout replaces both
operator pods by pods of the new tag and a new pod ends up holding the Lease; at no moment do two
replicas say they lead (each pod's ``backfill_operator_leader`` gauge, read every 0.25 s); every
Backfill Succeeds with exactly one Job, run 1, created once (the Job from before the upgrade, never replaced;
a second ``JobCreated`` Event for it is printed); its phase and checkpoint never go backwards in any
status read; every matching row of its non-idempotent counter table is 1 and every other row 0.
Prints ``UPGRADE-E2E`` figures (rollout and handover times) for docs/testing.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from e2e_support import (
    NS,
    RELEASE,
    RELEASE_NS,
    TIMEOUT,
    Cluster,
    CommandFailed,
    PodDatabase,
    helm_install_args,
    tag_image_on_node,
)
from psycopg import sql

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

BACKFILLS = 50
ROWS = 600
MATCHING = "id % 4 <> 0"  # 450 rows change; the other 150 must stay 0
MATCHING_ROWS = ROWS - ROWS // 4
ROWS_PER_SECOND = 4  # ~110 s a run: long enough to start all 50 and roll both operator pods mid-run
# Light worker pods: 50 at once on one 2-core node (the chart's default request of 100m CPU each
# would schedule only ~20).
WORKER_RESOURCES = {"requests": {"cpu": "5m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}}
PHASE_ORDER = {"": 0, "Pending": 1, "Running": 2, "Succeeded": 3}
LEADER_METRIC = re.compile(rb"^backfill_operator_leader ([0-9.]+)$", re.M)


def bf_name(i: int) -> str:
    return f"upgrade-{i:02d}"


def table(i: int) -> str:
    return f"counters_{i:02d}"


def make_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(BACKFILLS):
            name = sql.Identifier("public", table(i))
            conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0)").format(name))
            conn.execute(sql.SQL("INSERT INTO {} (id) SELECT generate_series(1, %s)").format(name), (ROWS,))


def histogram(dsn: str, i: int) -> dict[tuple[bool, int], int]:
    """(matches the Backfill's where, counter) -> rows."""
    query = sql.SQL("SELECT id % 4 <> 0, counter, count(*) FROM {} GROUP BY 1, 2").format(sql.Identifier("public", table(i)))
    with psycopg.connect(dsn) as conn:
        return {(bool(m), int(c)): int(n) for m, c, n in conn.execute(query).fetchall()}


def manifest(i: int, db: PodDatabase) -> dict[str, Any]:
    return {
        "apiVersion": "backfill.dev/v1alpha1",
        "kind": "Backfill",
        "metadata": {"name": bf_name(i), "namespace": NS},
        "spec": {
            "database": {"dsnSecretRef": {"name": db.secret, "key": "dsn"}},
            "table": f"public.{table(i)}",
            "set": {"counter": "counter + 1"},
            "where": MATCHING,
            "batch": {"size": 20, "minSize": 1, "maxSize": 20, "targetDuration": "0s"},
            "limits": {"maxRowsPerSecond": ROWS_PER_SECOND},
            "worker": {"resources": WORKER_RESOURCES},
        },
    }


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


@dataclass
class Observer:
    """Two threads while the test runs: every second the Backfills' status (phase and checkpoint
    must never go backwards), the operator pods and the Lease holder; every 0.25 s each operator
    pod's leader gauge (two at once, confirmed by a second read, is an overlap)."""

    cluster: Cluster
    names: set[str]
    stop: threading.Event = field(default_factory=threading.Event)
    last: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    regressions: list[str] = field(default_factory=list)
    progress_dips: list[str] = field(default_factory=list)
    pod_ips: dict[str, str] = field(default_factory=dict)
    holders: list[tuple[float, str]] = field(default_factory=list)
    leaders: list[tuple[float, frozenset[str]]] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for target in (self._status_loop, self._leader_loop):
            threading.Thread(target=self._forever, args=(target,), daemon=True).start()

    def _forever(self, step: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                step()
            except (CommandFailed, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
                time.sleep(1)  # a busy apiserver: the next read decides
            except Exception as error:  # a dead observer must fail the test, not pass it unobserved
                self.crashed.append(f"{step.__name__}: {error!r}")
                return

    def _status_loop(self) -> None:
        for bf in self.cluster.items("bf"):
            name = bf["metadata"]["name"]
            if name not in self.names:
                continue
            status = bf.get("status") or {}
            phase = str(status.get("phase") or "")
            rows = int((status.get("progress") or {}).get("rowsUpdated") or 0)
            key = ((status.get("shards") or {}).get("0") or {}).get("lastKey") or ["0"]
            now = (phase, rows, int(key[0]))
            before = self.last.get(name)
            if phase not in PHASE_ORDER:
                self.regressions.append(f"{name}: phase {phase}: {status.get('message')}")
            elif before is not None and (PHASE_ORDER[phase] < PHASE_ORDER[before[0]] or now[2] < before[2]):
                self.regressions.append(f"{name}: (phase, rowsUpdated, lastKey) went from {before} to {now}")
            elif before is not None and rows < before[1]:
                # status.progress is the operator's display aggregate (the checkpoint mirror is
                # shards.0.lastKey): known to dip when its patch from an older read lands after the
                # worker's own (docs/testing.md, "Rolling upgrade"); counted, not asserted.
                self.progress_dips.append(f"{name}: (phase, rowsUpdated, lastKey) went from {before} to {now}")
            self.last[name] = now
        listed = json.loads(self.cluster.kubectl("-n", RELEASE_NS, "get", "pods,leases", "-o", "json"))["items"]
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in listed
               if p["kind"] == "Pod" and p["status"].get("podIP")
               and (p["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == RELEASE}
        holder = next((str(lease["spec"].get("holderIdentity") or "") for lease in listed
                       if lease["kind"] == "Lease" and lease["metadata"]["name"] == RELEASE), "")
        with self.lock:
            self.pod_ips = ips
            if not self.holders or self.holders[-1][1] != holder:
                self.holders.append((time.monotonic(), holder))
        time.sleep(1)

    def _says_leader(self, ip: str) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{ip}:9090/metrics", timeout=2) as response:
                found = LEADER_METRIC.search(response.read())
        except OSError:  # not serving yet, or gone: not leading as far as anyone can tell
            return False
        return found is not None and float(found.group(1)) == 1.0

    def _leader_loop(self) -> None:
        with self.lock:
            ips = dict(self.pod_ips)
        leading = {pod for pod, ip in ips.items() if self._says_leader(ip)}
        if len(leading) > 1:  # a handover read half before, half after? read again at once
            again = {pod for pod in leading if self._says_leader(ips[pod])}
            if len(again) > 1:
                self.overlaps.append(f"{sorted(again)} all report backfill_operator_leader 1")
            leading = again
        self.leaders.append((time.monotonic(), frozenset(leading)))
        time.sleep(0.25)

    def longest_leaderless(self, since: float) -> float:
        """The longest stretch after ``since`` in which no pod said it leads (0.25 s resolution)."""
        longest, empty_from = 0.0, None
        for at, leading in self.leaders:
            if at < since:
                continue
            if not leading and empty_from is None:
                empty_from = at
            elif leading and empty_from is not None:
                longest, empty_from = max(longest, at - empty_from), None
        return longest


def operator_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return cluster.items("pods", RELEASE_NS, f"app.kubernetes.io/instance={RELEASE}")


def test_rolling_upgrade_during_50_running_backfills(operator_release: Cluster, pod_database: Any) -> None:
    cluster = operator_release
    repository, _, old_tag = cluster.image.rpartition(":")
    new_image = f"{repository}:{old_tag}-upgrade"
    tag_image_on_node(cluster.image, new_image)
    old_pods = {p["metadata"]["name"] for p in operator_pods(cluster) if not p["metadata"].get("deletionTimestamp")}
    assert len(old_pods) == 2, f"the chart runs two replicas: {old_pods}"
    db = pod_database("upgrade")
    make_tables(db.admin_dsn)
    names = [bf_name(i) for i in range(BACKFILLS)]
    observer = Observer(cluster, set(names))
    observer.start()
    try:
        applied = time.monotonic()
        cluster.apply({"apiVersion": "v1", "kind": "List", "items": [manifest(i, db) for i in range(BACKFILLS)]})

        def all_mid_run() -> bool:
            states = {bf["metadata"]["name"]: bf.get("status") or {} for bf in cluster.items("bf")}
            done = [n for n in names if states.get(n, {}).get("phase") == "Succeeded"]
            assert not done, f"{done} finished before all {BACKFILLS} had started: runs too short for this machine"
            return all((states.get(n, {}).get("progress") or {}).get("rowsUpdated") for n in names)

        cluster.wait_until(all_mid_run, f"all {BACKFILLS} Backfills updating rows", timeout=TIMEOUT)
        all_started = time.monotonic() - applied
        # The upgrade a user runs: same values, a new image tag (the worker default follows it).
        rollout_from = time.monotonic()
        cluster.helm("upgrade", RELEASE, *helm_install_args(cluster, "--reuse-values", "--set", f"image.tag={old_tag}-upgrade"))
        helm_seconds = time.monotonic() - rollout_from

        def rolled_out() -> list[dict[str, Any]] | None:
            pods = operator_pods(cluster)
            new = [p for p in pods if p["spec"]["containers"][0]["image"] == new_image and is_ready(p)]
            return new if len(pods) == 2 and len(new) == 2 and not old_pods & {p["metadata"]["name"] for p in pods} else None

        new_pods = {p["metadata"]["name"] for p in cluster.wait_until(rolled_out, "both operator pods replaced by the new tag", 300)}
        rollout_seconds = time.monotonic() - rollout_from
        cluster.wait_until(lambda: observer.holders and observer.holders[-1][1].rsplit("_", 1)[0] in new_pods, "a new pod holding the Lease", 60)
        running_at_rollout_end = sum(1 for n in names if observer.last.get(n, ("",))[0] == "Running")
        for name in names:
            cluster.wait_phase(name, "Succeeded")
        all_done = time.monotonic() - applied
        time.sleep(2)  # a last status read after the final phase
    finally:
        observer.stop.set()

    jobs = Counter(j["metadata"]["labels"]["backfill.dev/name"] for j in cluster.items("jobs", selector="backfill.dev/name"))
    created: Counter[str] = Counter()
    for event in json.loads(cluster.kubectl("-n", NS, "get", "events", "-o", "json", "--field-selector=reason=JobCreated"))["items"]:
        created[event["involvedObject"]["name"]] += int(event.get("count") or 1)
    handover = observer.longest_leaderless(rollout_from)
    print(f"UPGRADE-E2E backfills={BACKFILLS} all_started_seconds={all_started:.1f} helm_upgrade_seconds={helm_seconds:.1f} "
          f"rollout_seconds={rollout_seconds:.1f} longest_leaderless_seconds={handover:.2f} "
          f"lease_holders={[h.rsplit('_', 1)[0] for _, h in observer.holders]} running_at_rollout_end={running_at_rollout_end} "
          f"all_succeeded_seconds={all_done:.1f} jobs={sum(jobs[n] for n in names)} "
          f"progress_dips={len(observer.progress_dips)} {observer.progress_dips[:5]}", flush=True)

    assert observer.crashed == [], "an observer thread stopped"
    during = [leading for at, leading in observer.leaders if at >= rollout_from]
    assert len(during) >= rollout_seconds, f"the leader gauges were read {len(during)} times in {rollout_seconds:.0f} s"
    assert observer.overlaps == [], "two replicas led at once"
    assert observer.regressions == [], f"a status read went backwards (phase or checkpoint): {observer.regressions}"
    assert len({h for _, h in observer.holders if h}) >= 2, f"the Lease changed hands: {observer.holders}"
    for name in names:
        status = cluster.status(name)
        assert status["run"] == 1 and status["jobNames"] == [f"{name}-s0-r1"], f"{name}: {status}"
        assert status["progress"]["rowsUpdated"] == MATCHING_ROWS, f"{name}: {status['progress']}"
        job = cluster.get("job", f"{name}-s0-r1")
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == cluster.image, "the Job from before the upgrade"
        # Exactly one Job, never replaced. Events are best effort (rate-limited per object, a post may
        # fail under load); a second JobCreated for the same Job is reported, not failed: CI on 1.37 saw
        # one (a create answered 409 after the handover is taken as created and announced again).
        assert jobs[name] == 1, f"{name}: {jobs[name]} Jobs"
        if created[name] > 1:
            print(f"UPGRADE-E2E duplicate_job_created_event {name}: {created[name]} JobCreated events for 1 Job", flush=True)
    for i in range(BACKFILLS):
        assert histogram(db.admin_dsn, i) == {(True, 1): MATCHING_ROWS, (False, 0): ROWS - MATCHING_ROWS}, table(i)


@pytest.fixture(autouse=True)
def restore_release(operator_release: Cluster) -> Any:
    """Later tests expect the release on the session's image tag: roll back to it afterwards."""
    yield
    tag = operator_release.image.rpartition(":")[2]
    pods = operator_pods(operator_release)
    if any(p["spec"]["containers"][0]["image"] != operator_release.image for p in pods):
        operator_release.helm("upgrade", RELEASE, *helm_install_args(operator_release, "--reuse-values", "--set", f"image.tag={tag}"))
