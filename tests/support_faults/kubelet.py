"""Playing the Job controller and the kubelet for kmock, with the *real* worker process.

kmock has no Job controller (see tests/kube_support/emulator.py). This helper watches Jobs the
operator creates and, for each, does what a cluster would: resolves the container's env
(``valueFrom.secretKeyRef`` from the Secret, as the kubelet does), starts the container's
command (``backfill worker ...``) as a real subprocess talking HTTP to the same API server,
sets ``status.active``, and on exit writes ``Complete`` or ``Failed``. By default one failed
pod fails the Job; with ``restart_failed_pods`` a failed pod is replaced, as the Job
controller does, until ``spec.backoffLimit`` failures. Two deliberate differences from a cluster: the
pod's metrics port is remapped to a free local port (pods have their own network namespace;
tests share one), and stdout/stderr go to files so tests can read every line the pod wrote.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backfill_api.kubeapi import KubeApi, core_path, jobs_path

from .cli import backfill_executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kubeconfig(directory: Path, server: str) -> Path:
    """A kubeconfig for an unauthenticated API URL (kmock)."""
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    return path


@dataclass
class Pod:
    job: str
    name: str
    process: subprocess.Popen
    stdout: Path
    stderr: Path
    metrics_port: int
    exit_code: int | None = None


@dataclass
class FakeKubelet:
    api: KubeApi
    namespace: str
    kubeconfig: Path
    log_dir: Path
    restart_failed_pods: bool = False
    pods: dict[str, Pod] = field(default_factory=dict)
    """The current (latest) pod of each Job."""
    history: list[Pod] = field(default_factory=list)
    """Every pod ever started, in order."""
    jobs_seen: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _secret_value(self, name: str, key: str) -> str:
        secret = await self._call(self.api.get, core_path(self.namespace, "secrets", name))
        return base64.b64decode(secret["data"][key]).decode()

    async def _environment(self, container: dict[str, Any], metrics_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                env[item["name"]] = await self._secret_value(ref["name"], ref.get("key", "dsn"))
        env["BACKFILL_METRICS_PORT"] = str(metrics_port)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        return env

    async def _start(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["backfill"], container["command"]
        pod = await self._spawn(container, name, f"{name}-{len([p for p in self.history if p.job == name])}")
        self.pods[name] = pod
        await self._call(self.api.merge_patch, jobs_path(self.namespace, name), {"status": {"active": 1}})

    async def start_duplicate(self, job_name: str) -> Pod:
        """A second pod for a Job, outside the Job's accounting: what a cluster produces when a
        node is partitioned and the Job controller replaces a pod that is in fact still running."""
        job = await self._call(self.api.get, jobs_path(self.namespace, job_name))
        container = job["spec"]["template"]["spec"]["containers"][0]
        # In history for output() and kill_all(), but not in self.pods: not the Job's pod.
        return await self._spawn(container, job_name, f"{job_name}-duplicate")

    async def _spawn(self, container: dict[str, Any], job_name: str, pod_name: str) -> Pod:
        """Run the container's command as a real `backfill` process, with its env resolved."""
        port = free_port()
        env = await self._environment(container, port)
        out, err = self.log_dir / f"{pod_name}.out", self.log_dir / f"{pod_name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [*backfill_executable(), *container["args"]], env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
            )
        pod = Pod(job_name, pod_name, process, out, err, port)
        self.history.append(pod)
        return pod

    async def _finish(self, pod: Pod, code: int) -> None:
        pod.exit_code = code
        if code != 0 and self.restart_failed_pods:
            failures = self.failures[pod.job] = self.failures.get(pod.job, 0) + 1
            try:
                job = await self._call(self.api.get, jobs_path(self.namespace, pod.job))
            except Exception:  # deleted meanwhile
                return
            if failures <= int(job["spec"].get("backoffLimit", 6)):
                await self._call(self.api.merge_patch, jobs_path(self.namespace, pod.job), {"status": {"failed": failures}})
                await self._start(job)  # the Job controller replaces the failed pod
                return
        condition = {"type": "Complete" if code == 0 else "Failed", "status": "True"}
        if code != 0:
            condition |= {"reason": "BackoffLimitExceeded", "message": f"the worker pod exited with code {code}"}
        status = {"active": 0, "succeeded": int(code == 0), "failed": int(code != 0), "conditions": [condition]}
        try:
            await self._call(self.api.merge_patch, jobs_path(self.namespace, pod.job), {"status": status})
        except Exception:  # the Job was deleted meanwhile (suspend): nothing to report
            pass

    async def step(self) -> None:
        """One reconciliation pass: start pods for new Jobs, report pods that ended."""
        for job in await self._call(self.api.list, jobs_path(self.namespace)):
            name = job["metadata"]["name"]
            if name not in self.jobs_seen:
                self.jobs_seen.append(name)
                await self._start(job)
        for pod in list(self.pods.values()):
            if pod.exit_code is None and (code := pod.process.poll()) is not None:
                await self._finish(pod, code)

    async def run(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            await self.step()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    async def wait_finished(self, job_name: str, timeout: float = 30.0) -> Pod:
        """Until the Job's current pod has exited and been reported (a worker reports ``done``
        in its status a moment before its process ends)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (pod := self.pods[job_name]).exit_code is None:
            assert asyncio.get_running_loop().time() < deadline, f"{pod.name} still running after {timeout} s"
            await asyncio.sleep(0.05)
        return pod

    def kill_all(self) -> None:
        for pod in self.history:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGKILL)
                pod.process.wait(10)

    def output(self) -> dict[str, str]:
        """Everything every pod wrote, by ``<job> stdout|stderr``."""
        captured = {}
        for pod in self.history:
            captured[f"{pod.name} stdout"] = pod.stdout.read_text(errors="replace")
            captured[f"{pod.name} stderr"] = pod.stderr.read_text(errors="replace")
        return captured
