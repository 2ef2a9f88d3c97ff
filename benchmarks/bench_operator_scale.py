"""The operator at scale on a REAL kube-apiserver: N Backfills over 20 namespaces (issue 21).

Steps: create all, edit all (``spec.batch.size``), suspend all, resume all, delete all. For each
step: the time until every Backfill shows the expected state (polled every 2 s, so settle times
are rounded up to that), the operator's requests per second during the step (audit log, the
operator's ServiceAccount only), and at the end of the run the requests per second at rest with
all N idle, the Jobs per shard (every POST jobs: 201, none twice), and the operator process's
peak RSS and CPU seconds (it runs as ``backfill operator``, a process of its own, cluster-wide,
without leader election).

No controller-manager (only etcd and kube-apiserver are started): no pods, no garbage collector;
the operator's own work is what is measured. Needs ``KUBEBUILDER_ASSETS``.

    python benchmarks/bench_operator_scale.py --backfills 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kube_support.control_plane import ControlPlane  # noqa: E402
from kube_support.operator_cluster import prepare  # noqa: E402
from test_kube_real_apiserver import OPERATOR_NS, token_for  # noqa: E402

from backfill_api.kubeapi import backfill_path, jobs_path  # noqa: E402
from backfill_operator import rbac  # noqa: E402

NAMESPACES = 20
POLL = 2.0
USER = f"system:serviceaccount:{OPERATOR_NS}:{rbac.OPERATOR_NAME}"


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of a process, from /proc."""
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backfills", type=int, default=1000)
    parser.add_argument("--rest-seconds", type=float, default=30.0)
    parser.add_argument("--step-timeout", type=float, default=900.0)
    args = parser.parse_args()
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        sys.exit("KUBEBUILDER_ASSETS is not set (docs/testing.md)")
    # etcd and kube-apiserver only: the operator's work, not the controller-manager's.
    only = Path(tempfile.mkdtemp(prefix="bench-assets-"))
    for binary in ("etcd", "kube-apiserver"):
        (only / binary).symlink_to(Path(assets) / binary)
    plane = ControlPlane(only, audit=True).start()
    operator: subprocess.Popen[bytes] | None = None
    try:
        home = Path(tempfile.mkdtemp(prefix="bench-kube-"))
        namespaces = [f"scale-{i:02d}" for i in range(NAMESPACES)]
        admin = prepare(plane, home, namespaces)
        kubeconfig = plane.write_kubeconfig(home / "operator", token_for(admin, OPERATOR_NS, rbac.OPERATOR_NAME))
        names = [(namespaces[i % NAMESPACES], f"bf-{i:04d}") for i in range(args.backfills)]
        log = open(home / "operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen([str(Path(sys.executable).parent / "backfill"), "operator", "--metrics-port", "0",
                                     "--kubeconfig", str(kubeconfig)], stdout=log, stderr=log,
                                    env={**os.environ, "BACKFILL_LOG_FORMAT": "text"})
        time.sleep(5)
        peak = {"rss": proc_stats(operator.pid)[0]}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                peak["rss"] = max(peak["rss"], proc_stats(operator.pid)[0])  # type: ignore[union-attr]

        threading.Thread(target=sample, daemon=True).start()
        pool = ThreadPoolExecutor(max_workers=8)

        def each(action: Callable[[str, str], Any]) -> None:
            list(pool.map(lambda pair: action(*pair), names))

        def listed() -> list[dict[str, Any]]:
            return [b for ns in namespaces for b in admin.list(backfill_path(ns))]

        def settle(what: str, done: Callable[[list[dict[str, Any]]], bool]) -> None:
            deadline = time.monotonic() + args.step_timeout
            while not done(listed()):
                if time.monotonic() > deadline:
                    raise SystemExit(f"step {what} did not settle within {args.step_timeout} s")
                time.sleep(POLL)

        def all_(check: Callable[[dict[str, Any]], bool]) -> Callable[[list[dict[str, Any]]], bool]:
            return lambda items: len(items) == len(names) and all(check(b) for b in items)

        steps: dict[str, dict[str, float]] = {}
        cpu_start = proc_stats(operator.pid)[1]

        def step(name: str, action: Callable[[str, str], Any], done: Callable[[list[dict[str, Any]]], bool]) -> None:
            started, epoch = time.monotonic(), time.time()
            each(action)
            settle(name, done)
            seconds = time.monotonic() - started
            ours = [r for r in plane.audited(epoch, time.time()) if r.user == USER]
            steps[name] = {"settle_seconds": round(seconds, 1), "operator_requests_per_second": round(len(ours) / seconds, 1)}
            print(f"{name}: {steps[name]}", flush=True)

        spec = {"database": {"dsnSecretRef": {"name": "db"}}, "table": "t", "set": {"v": "1"}}
        step("create", lambda ns, n: admin.create(backfill_path(ns), {
            "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill", "metadata": {"name": n, "namespace": ns}, "spec": spec}),
             all_(lambda b: (b.get("status") or {}).get("jobNames") == [f"{b['metadata']['name']}-s0-r1"]))
        rest_start = time.time() + 10.0
        time.sleep(10.0 + args.rest_seconds)
        at_rest = [r for r in plane.audited(rest_start, rest_start + args.rest_seconds) if r.user == USER]
        step("edit", lambda ns, n: admin.merge_patch(backfill_path(ns, n), {"spec": {"batch": {"size": 500}}}),
             all_(lambda b: (b.get("status") or {}).get("observedGeneration") == 2))
        step("suspend", lambda ns, n: admin.merge_patch(backfill_path(ns, n), {"spec": {"suspend": True}}),
             all_(lambda b: (b.get("status") or {}).get("phase") == "Paused"))
        step("resume", lambda ns, n: admin.merge_patch(backfill_path(ns, n), {"spec": {"suspend": False}}),
             all_(lambda b: (b.get("status") or {}).get("jobNames") == [f"{b['metadata']['name']}-s0-r2"]))
        step("delete", lambda ns, n: admin.delete(backfill_path(ns, n)), lambda items: not items)
        cpu = proc_stats(operator.pid)[1] - cpu_start
        sampling.set()
        pool.shutdown()
        posts = [r for r in plane.audited() if r.user == USER and r.verb == "create" and r.resource == "jobs"]
        # Suspending deleted run 1's Jobs; no garbage collector here, so run 2's are all still there.
        job_total = sum(len(admin.list(jobs_path(ns))) for ns in namespaces)
        print("OPERATOR-SCALE " + json.dumps({
            "backfills": args.backfills, "namespaces": NAMESPACES, "steps": steps,
            "at_rest_requests_per_second": round(len(at_rest) / args.rest_seconds, 2),
            "at_rest_requests": dict(Counter(f"{r.verb} {r.resource}" for r in at_rest)),
            "job_creates": dict(Counter(r.code for r in posts)), "jobs_expected": args.backfills, "jobs_found": job_total,
            "operator_rss_mib_peak": round(peak["rss"], 1), "operator_cpu_seconds": round(cpu, 1),
        }, sort_keys=True), flush=True)
        admin.close()
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        plane.stop()


if __name__ == "__main__":
    main()
