"""Worker Jobs: rendering (one Job per shard) and reading their state back (PURE).

One plain Job per shard rather than an Indexed Job, so that it works on Kubernetes 1.20 (Indexed
Jobs arrived in 1.21) and so that one shard can be relaunched alone. Names are deterministic
(``<name>-s<shard>-r<run>``) so a restarted operator finds, rather than duplicates, what it
created. The DSN reaches the pod only through a ``secretKeyRef``: the Job never contains it.

What the API server supports is decided from its version (:func:`server_capabilities`): on 1.26+
the Job carries a ``podFailurePolicy`` that fails it at the first worker exit code meaning "no
retry can fix this" (instead of ``backoffLimit`` retries) and does not count evicted pods as
failures. Whether a stored Job has that policy is read from the Job itself
(:func:`fails_itself_on_permanent_error`): a server with the feature gate off drops the field.
Pods are read back only to say why a worker died (:func:`oom_kills`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kubernetes.client import (
    ApiClient,
    V1Container,
    V1ContainerPort,
    V1EnvVar,
    V1EnvVarSource,
    V1Job,
    V1JobSpec,
    V1ObjectMeta,
    V1OwnerReference,
    V1PodFailurePolicy,
    V1PodFailurePolicyOnExitCodesRequirement,
    V1PodFailurePolicyOnPodConditionsPattern,
    V1PodFailurePolicyRule,
    V1PodSpec,
    V1PodTemplateSpec,
    V1SecretKeySelector,
)

from backfill_api.model import API_GROUP, API_VERSION, KIND, BackfillSpec
from backfill_api.status import StallReason, error_classes

MAX_NAME = 63  # a label value and a DNS label: the Job name is copied into the Pod's job-name label
LABEL_NAME = "backfill.dev/name"
LABEL_SHARD = "backfill.dev/shard"
LABEL_RUN = "backfill.dev/run"
MANAGED_BY = "backfill-operator"
DSN_ENV = "BACKFILL_DSN"
RUN_ENV = "BACKFILL_RUN"
METRICS_PORT = 9090

JobState = Literal["pending", "running", "succeeded", "failed"]
CONTAINER = "worker"
POD_FAILURE_POLICY_SINCE = (1, 26)
"""``Job.spec.podFailurePolicy``: beta and on by default from 1.26 (alpha, off, in 1.25)."""

DEFAULT_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
DEFAULT_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class WorkerDefaults:
    """Operator-wide settings used where ``spec.worker`` says nothing."""

    image: str = "ghcr.io/backfill-dev/backfill-operator:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account_name: str | None = "backfill-worker"
    resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
    )
    termination_grace_seconds: int = 60
    """Time for the worker to finish (or roll back) its current batch on SIGTERM."""
    security_context: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONTAINER_SECURITY_CONTEXT))
    pod_security_context: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_POD_SECURITY_CONTEXT))


DEFAULT_WORKER = WorkerDefaults()


@dataclass(frozen=True)
class ServerCapabilities:
    """What the API server's Job API offers beyond 1.20's."""

    pod_failure_policy: bool = False


BASELINE = ServerCapabilities()
"""Kubernetes 1.20, or a server whose version could not be read: plain Jobs."""


def server_capabilities(version: Mapping[str, Any] | None) -> ServerCapabilities:
    """From the API server's ``/version`` body (``major``/``minor`` such as ``"1"``/``"26+"``,
    else ``gitVersion`` such as ``v1.37.2``); anything unreadable is the baseline."""
    if not version:
        return BASELINE
    try:
        major_minor = (int(str(version["major"]).rstrip("+")), int(str(version["minor"]).rstrip("+")))
    except (KeyError, ValueError):
        parts = str(version.get("gitVersion", "")).lstrip("v").split(".")
        try:
            major_minor = (int(parts[0]), int(parts[1]))
        except (IndexError, ValueError):
            return BASELINE
    return ServerCapabilities(pod_failure_policy=major_minor >= POD_FAILURE_POLICY_SINCE)


def permanent_exit_codes() -> list[int]:
    """Worker exit codes that only permanent errors use (no pod restart can fix them)."""
    permanent = {c.exit_code for c in error_classes() if StallReason.of_worker(c.reason).permanent}
    others = {c.exit_code for c in error_classes() if not StallReason.of_worker(c.reason).permanent}
    return sorted(permanent - others)


def _pod_failure_policy() -> V1PodFailurePolicy:
    return V1PodFailurePolicy(rules=[
        V1PodFailurePolicyRule(action="FailJob", on_exit_codes=V1PodFailurePolicyOnExitCodesRequirement(
            container_name=CONTAINER, operator="In", values=permanent_exit_codes(),
        )),
        V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True"),
        ]),
    ])


def pod_failure_policy() -> dict[str, Any]:
    """Fail the Job at once on a permanent worker error; an evicted or preempted pod
    (``DisruptionTarget``) is retried without using up ``backoffLimit``."""
    return _wire(_pod_failure_policy())


def _wire(model: Any) -> dict[str, Any]:
    """A kubernetes client model as the API's JSON (camelCase keys, unset fields left out)."""
    wire: dict[str, Any] = _SERIALIZER.sanitize_for_serialization(model)
    return wire


_SERIALIZER = ApiClient()
"""Only its (pure) ``sanitize_for_serialization``: it never opens a connection."""


def fit_name(base: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """``base + suffix`` within ``limit`` characters; when too long, truncate and add a hash of ``base``."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def job_name(backfill_name: str, shard: int, run: int) -> str:
    return fit_name(backfill_name, f"-s{shard}-r{run}")


def selector_labels(backfill_name: str) -> dict[str, str]:
    return {LABEL_NAME: fit_name(backfill_name), "app.kubernetes.io/managed-by": MANAGED_BY}


def job_labels(backfill_name: str, shard: int, run: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "backfill-worker",
        "app.kubernetes.io/instance": fit_name(backfill_name),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "backfill-operator",
        **selector_labels(backfill_name),
        LABEL_SHARD: str(shard),
        LABEL_RUN: str(run),
    }


def render_job(
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: BackfillSpec,
    shard: int,
    run: int,
    defaults: WorkerDefaults = DEFAULT_WORKER,
    capabilities: ServerCapabilities = BASELINE,
) -> dict[str, Any]:
    """The ``batch/v1`` Job for one shard of one run (1.20's form unless ``capabilities`` say more)."""
    worker = spec.worker
    ref = spec.database.dsn_secret_ref
    if ref is None:
        raise ValueError("spec.database.dsnSecretRef is required in a cluster: name the Secret holding the DSN")
    labels = job_labels(name, shard, run)
    container = V1Container(
        name=CONTAINER,
        image=worker.image or defaults.image,
        image_pull_policy=worker.image_pull_policy or defaults.image_pull_policy,
        command=["backfill"],
        args=["worker", "--namespace", namespace, "--name", name, "--shard", str(shard)],
        env=[
            V1EnvVar(name=DSN_ENV, value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=ref.name, key=ref.key))),
            V1EnvVar(name=RUN_ENV, value=str(run)),
            # Read by the root `backfill` command: JSON logs at INFO, metrics on the metrics port.
            V1EnvVar(name="BACKFILL_LOG_FORMAT", value="json"),
            V1EnvVar(name="BACKFILL_LOG_LEVEL", value="INFO"),
            V1EnvVar(name="BACKFILL_METRICS_PORT", value=str(METRICS_PORT)),
        ],
        ports=[V1ContainerPort(name="metrics", container_port=METRICS_PORT)],
    )
    pod_spec = V1PodSpec(
        restart_policy="Never",
        termination_grace_period_seconds=defaults.termination_grace_seconds,
        containers=[container],
        service_account_name=worker.service_account_name or defaults.service_account_name or None,
    )
    job_spec = V1JobSpec(
        backoff_limit=worker.backoff_limit,
        template=V1PodTemplateSpec(metadata=V1ObjectMeta(labels=labels), spec=pod_spec),
        active_deadline_seconds=worker.active_deadline_seconds or None,
        pod_failure_policy=_pod_failure_policy() if capabilities.pod_failure_policy else None,
    )
    job = V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=V1ObjectMeta(
            name=job_name(name, shard, run),
            namespace=namespace,
            labels=labels,
            annotations={"backfill.dev/spec-fingerprint": spec.fingerprint()},
            owner_references=[V1OwnerReference(
                api_version=f"{API_GROUP}/{API_VERSION}", kind=KIND, name=name, uid=uid, controller=True,
                block_owner_deletion=True,
            )],
        ),
        spec=job_spec,
    )
    manifest = _wire(job)
    # The user's own blocks go out exactly as written (the client's models would drop fields they
    # do not know, e.g. ones newer than the client): set on the wire form, not the models.
    pod = manifest["spec"]["template"]["spec"]
    pod["containers"][0]["resources"] = worker.resources if worker.resources is not None else dict(defaults.resources)
    pod["containers"][0]["securityContext"] = worker.security_context or dict(defaults.security_context)
    pod["securityContext"] = worker.pod_security_context or dict(defaults.pod_security_context)
    if worker.node_selector:
        pod["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in worker.tolerations]
    return manifest


def _label_int(job: Mapping[str, Any], label: str) -> int | None:
    value = (job.get("metadata", {}).get("labels") or {}).get(label)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def job_shard(job: Mapping[str, Any]) -> int | None:
    return _label_int(job, LABEL_SHARD)


def job_run(job: Mapping[str, Any]) -> int | None:
    return _label_int(job, LABEL_RUN)


def owned_by(job: Mapping[str, Any], uid: str) -> bool:
    refs = job.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def job_state(job: Mapping[str, Any]) -> JobState:
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") == "Complete":
            return "succeeded"
        if condition.get("status") == "True" and condition.get("type") == "Failed":
            return "failed"
    if status.get("active"):
        return "running"
    return "pending"


def job_failure_message(job: Mapping[str, Any]) -> str:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".strip(": ")
    return "the worker Job failed"


def fails_itself_on_permanent_error(job: Mapping[str, Any]) -> bool:
    """The stored Job has the FailJob rule (the server kept ``podFailurePolicy``): the Job
    controller ends it on a permanent worker error, so the operator need not delete it, and
    the failed pod (and its logs) stay for ``kubectl logs``."""
    rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
    codes = set(permanent_exit_codes())
    return any(
        r.get("action") == "FailJob" and codes <= set((r.get("onExitCodes") or {}).get("values") or [])
        and (r.get("onExitCodes") or {}).get("operator") == "In"
        for r in rules
    )


def has_failed_pods(jobs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any Job counts a failed pod: only then are the pods worth reading (why it died)."""
    return any(int((j.get("status") or {}).get("failed") or 0) > 0 for j in jobs)


@dataclass(frozen=True)
class OomKill:
    """A worker container the kernel killed for exceeding its memory limit."""

    pod: str
    uid: str
    limit: str
    """The container's ``resources.limits.memory`` (empty: none set, the node ran out)."""


def oom_kills(pods: Sequence[Mapping[str, Any]], job: Mapping[str, Any]) -> list[OomKill]:
    """The pods of ``job`` whose worker container was OOMKilled, oldest first."""
    shard, run = job_shard(job), job_run(job)
    found: list[tuple[str, OomKill]] = []
    for pod in pods:
        if shard is None or (_label_int(pod, LABEL_SHARD), _label_int(pod, LABEL_RUN)) != (shard, run):
            continue
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        for container in status.get("containerStatuses") or []:
            if container.get("name") != CONTAINER:
                continue
            ends = [(container.get(k) or {}).get("terminated") or {} for k in ("state", "lastState")]
            if any(t.get("reason") == "OOMKilled" for t in ends):
                spec_containers = (pod.get("spec") or {}).get("containers") or []
                limits = next(
                    ((c.get("resources") or {}).get("limits") or {} for c in spec_containers if c.get("name") == CONTAINER),
                    {},
                )
                kill = OomKill(str(meta.get("name", "")), str(meta.get("uid", "")), str(limits.get("memory", "")))
                found.append((str(meta.get("creationTimestamp", "")), kill))
    return [kill for _, kill in sorted(found, key=lambda item: item[0])]


def oom_message(kill: OomKill) -> str:
    """What the user reads, with the field to change."""
    limit = f"its memory limit {kill.limit}" if kill.limit else "the node's free memory (no memory limit set)"
    return (
        f"worker pod {kill.pod} was OOMKilled: it needed more than {limit}; raise "
        "spec.worker.resources.limits.memory (and requests.memory)"
    )
