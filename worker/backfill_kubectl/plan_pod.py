"""The short-lived Pod that runs ``backfill plan`` in the cluster, where the DSN is (PURE).

It is the worker pod the operator would create (``backfill_operator.jobs.render_job``: the same
image, ``secretKeyRef`` env for the DSN, service account, security contexts, resources), with
the command changed to ``backfill plan`` and the manifest handed in through a ``downwardAPI``
volume from one of the Pod's own annotations: no ConfigMap to create and clean up, and nothing
written to the database (``plan`` only reads, and its sample batch is rolled back).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import yaml

from backfill_api.model import API_GROUP, API_VERSION, KIND, BackfillSpec
from backfill_api.specdiff import decode_applied, effective_spec
from backfill_operator.jobs import CONTAINER, DEFAULT_WORKER, WorkerDefaults, fit_name, render_job

MANIFEST_ANNOTATION = "backfill.dev/plan-manifest"
LABEL_PLAN_FOR = "backfill.dev/plan-for"
MOUNT = "/etc/backfill-plan"
MANIFEST_FILE = "backfill.yaml"


def plan_manifest(name: str, namespace: str, raw_spec: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest ``backfill plan`` reads: the spec the workers run (immutable fields as the
    operator recorded them in ``backfill.dev/applied-spec``, when it has), without status."""
    applied = decode_applied(annotations or {})
    spec = effective_spec(raw_spec, applied) if applied else dict(raw_spec)
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def defaults_from_job(job: Mapping[str, Any] | None, image: str | None = None) -> WorkerDefaults:
    """The operator-wide worker settings as its newest Job of this Backfill shows them (the
    chart's image, pull policy and service account), so the plan pod matches the workers."""
    overrides: dict[str, Any] = {}
    pod = ((job or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    container = next((c for c in pod.get("containers") or [] if c.get("name") == CONTAINER), None)
    if container is not None:
        overrides["image"] = container.get("image") or DEFAULT_WORKER.image
        if container.get("imagePullPolicy"):
            overrides["image_pull_policy"] = container["imagePullPolicy"]
        overrides["service_account_name"] = pod.get("serviceAccountName") or None
    if image:
        overrides["image"] = image
    return WorkerDefaults(**overrides)


def plan_pod_name(name: str, suffix: str | None = None) -> str:
    return fit_name(name, f"-plan-{suffix or secrets.token_hex(3)}")


def render_plan_pod(
    manifest: Mapping[str, Any], *, defaults: WorkerDefaults = DEFAULT_WORKER, pod_name: str | None = None,
    deadline_seconds: int = 600,
) -> dict[str, Any]:
    """A ``v1`` Pod running ``backfill plan`` on ``manifest`` (already validated by the caller:
    ``BackfillSpec.model_validate`` raises on a bad spec, before anything is created)."""
    meta = manifest["metadata"]
    name, namespace = str(meta["name"]), str(meta["namespace"])
    spec = BackfillSpec.model_validate(dict(manifest["spec"]))
    job = render_job(name=name, namespace=namespace, uid="", spec=spec, shard=0, run=0, defaults=defaults)
    pod_spec = dict(job["spec"]["template"]["spec"])
    container = dict(pod_spec["containers"][0])
    container["args"] = ["plan", f"{MOUNT}/{MANIFEST_FILE}"]
    # No metrics endpoint, and no worker identity: the plan is not a shard of a run.
    # The pod's log is the plan's output: engine logs only from warnings up.
    container["env"] = [
        {**e, "value": "WARNING"} if e["name"] == "BACKFILL_LOG_LEVEL" else e
        for e in container["env"] if e["name"] not in ("BACKFILL_METRICS_PORT", "BACKFILL_RUN")
    ]
    container.pop("ports", None)
    container["volumeMounts"] = [{"name": "manifest", "mountPath": MOUNT, "readOnly": True}]
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [{
        "name": "manifest",
        "downwardAPI": {"items": [{"path": MANIFEST_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{MANIFEST_ANNOTATION}']"}}]},
    }]
    pod_spec["activeDeadlineSeconds"] = deadline_seconds  # a plan that hangs is ended by the kubelet
    pod_spec["restartPolicy"] = "Never"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name or plan_pod_name(name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "backfill-plan",
                "app.kubernetes.io/component": "plan",
                "app.kubernetes.io/part-of": "backfill-operator",
                "app.kubernetes.io/managed-by": "kubectl-backfill",
                LABEL_PLAN_FOR: fit_name(name),
            },
            "annotations": {MANIFEST_ANNOTATION: yaml.safe_dump(dict(manifest), sort_keys=False)},
        },
        "spec": pod_spec,
    }


def pod_outcome(pod: Mapping[str, Any]) -> tuple[bool, int | None, str]:
    """Whether the plan pod is over, its container's exit code, and why when it did not run
    (image pull errors, an unschedulable pod, a missing Secret key: the pod waits forever)."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if "terminated" in state:
            return True, int((state["terminated"] or {}).get("exitCode", 1)), str((state["terminated"] or {}).get("reason", ""))
        waiting = (state.get("waiting") or {})
        if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "CreateContainerConfigError",
                                     "InvalidImageName", "CreateContainerError"):
            return True, None, f"{waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": ")
    if status.get("phase") in ("Succeeded", "Failed"):
        return True, 0 if status["phase"] == "Succeeded" else 1, str(status.get("reason") or status.get("message") or "")
    return False, None, ""
