"""The plugin's I/O: the kubeconfig as kubectl reads it, and every API call it makes.

Each call names the verb and resource it needs, so that a 403 becomes "cannot <verb> <resource>
in namespace <ns>"; a missing kubeconfig, an unreachable server or refused credentials become
:class:`PluginError` with exit code 6 instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from backfill_api.kubeapi import BACKFILLS as GROUP_PATH
from backfill_api.kubeapi import KubeApi, KubeApiError, backfill_path, core_path, jobs_path
from backfill_api.model import API_GROUP, PLURAL
from backfill_operator.jobs import LABEL_NAME, MANAGED_BY, fit_name

from .view import Exit, describe_forbidden

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
BACKFILLS = f"{PLURAL}.{API_GROUP}"


class PluginError(Exception):
    """A user-facing failure with its exit code (no traceback, no secret: API messages only)."""

    def __init__(self, message: str, code: Exit):
        super().__init__(message)
        self.code = code


def connect(kubeconfig: str | None, context: str | None) -> tuple[KubeApi, str]:
    """The client and the namespace of the context (``default`` when it names none), as kubectl:
    ``--kubeconfig`` > ``$KUBECONFIG`` > ``~/.kube/config``; in a pod without either, in-cluster."""
    configuration = k8s_client.Configuration()
    configuration.retries = 0  # fail fast when the server is down: kubectl does not retry either
    explicit = kubeconfig or os.environ.get("KUBECONFIG")
    default_file = Path(os.path.expanduser("~/.kube/config"))
    in_cluster = not explicit and not default_file.exists() and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else "default"
        else:
            if not explicit and not default_file.exists():
                raise ConfigException(f"no kubeconfig: {default_file} does not exist and $KUBECONFIG is not set")
            k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            contexts, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), None) if context else active
            namespace = str(((chosen or {}).get("context") or {}).get("namespace") or "default")
    except (ConfigException, OSError) as error:
        source = "in-cluster service account" if in_cluster else f"kubeconfig {explicit or default_file}"
        raise PluginError(f"no cluster: {error} ({source}; pass --kubeconfig or --context, or set KUBECONFIG)", Exit.NO_CLUSTER) from None
    return KubeApi(configuration, timeout=15.0), namespace


class Cluster:
    """The API calls of the plugin, each mapped to a clear error."""

    def __init__(self, api: KubeApi):
        self.api = api

    def close(self) -> None:
        self.api.close()

    def _call(self, verb: str, resource: str, namespace: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KubeApiError as error:
            raise self.translate(error, verb, resource, namespace) from None
        except urllib3.exceptions.HTTPError as error:
            raise PluginError(f"no cluster: cannot reach the API server {self.api.configuration.host}: "
                              f"{type(error).__name__}: {getattr(error, 'reason', error)}", Exit.NO_CLUSTER) from None

    def translate(self, error: KubeApiError, verb: str, resource: str, namespace: str | None) -> PluginError:
        message = str(error).split(": ", 1)[-1]
        if error.status == 403:
            return PluginError(describe_forbidden(verb, resource, namespace, message), Exit.FORBIDDEN)
        if error.status == 401:
            return PluginError(f"unauthorized: the API server {self.api.configuration.host} refused the credentials "
                               "of this kubeconfig context (expired token?)", Exit.NO_CLUSTER)
        if error.status == 0:  # the client's own failure (TLS)
            return PluginError(f"no cluster: {error.reason}", Exit.NO_CLUSTER)
        if error.status == 404:
            return PluginError(f"not found: {message}", Exit.NOT_FOUND)
        return PluginError(f"cannot {verb} {resource}{f' in namespace {namespace}' if namespace else ''}: {error}", Exit.FAILED)

    # -- Backfills ----------------------------------------------------------------------------

    def backfill(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            found: dict[str, Any] = self._call("get", BACKFILLS, namespace, self.api.get, backfill_path(namespace, name))
        except PluginError as error:
            if error.code is not Exit.NOT_FOUND:
                raise
            if name not in str(error):  # "the server could not find the requested resource"
                raise PluginError("the Backfill CRD (backfills.backfill.dev) is not installed in this cluster: "
                                  "`backfill crd | kubectl apply -f -` or the Helm chart installs it", Exit.NOT_FOUND) from None
            raise PluginError(f'Backfill "{name}" not found in namespace "{namespace}" '
                              "(kubectl backfill list -A shows them all)", Exit.NOT_FOUND) from None
        return found

    def backfills(self, namespace: str | None) -> list[dict[str, Any]]:
        path = backfill_path(namespace) if namespace else f"{GROUP_PATH}/{PLURAL}"
        items: list[dict[str, Any]] = self._call("list", BACKFILLS, namespace, self.api.list, path)
        return items

    def patch_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self._call("patch", BACKFILLS, namespace, self.api.merge_patch, backfill_path(namespace, name), {"spec": dict(spec)})
        return patched

    # -- what belongs to a Backfill -----------------------------------------------------------

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        query = {"fieldSelector": f"involvedObject.name={name},involvedObject.kind=Backfill"}
        body = self._call("list", "events", namespace, self.api.request, "GET", core_path(namespace, "events"), query=query)
        return list(body.get("items") or [])

    def worker_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = {LABEL_NAME: fit_name(name), "app.kubernetes.io/managed-by": MANAGED_BY}
        pods: list[dict[str, Any]] = self._call("list", "pods", namespace, self.api.list, core_path(namespace, "pods"), selector)
        return pods

    def jobs(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = {LABEL_NAME: fit_name(name)}
        found: list[dict[str, Any]] = self._call("list", "jobs.batch", namespace, self.api.list, jobs_path(namespace), selector)
        return found

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call("get", "secrets", namespace, self.api.get, core_path(namespace, "secrets", name))
        except PluginError:
            return None  # not readable: the report still redacts DSN-shaped passwords by pattern
        return found

    def pods_by_label(self, namespace: str | None, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        path = core_path(namespace, "pods") if namespace else "/api/v1/pods"
        found: list[dict[str, Any]] = self._call("list", "pods", namespace, self.api.list, path, selector)
        return found

    def logs(self, namespace: str, pod: str, *, tail: int | None = None, timestamps: bool = True, container: str | None = None) -> str:
        query = {"timestamps": "true" if timestamps else "false"}
        if tail is not None:
            query["tailLines"] = str(tail)
        if container:
            query["container"] = container
        text: str = self._call("get", "pods/log", namespace, self.api.text, core_path(namespace, "pods", pod) + "/log", query)
        return text

    def follow(self, namespace: str, pod: str, *, tail: int | None = None) -> Iterator[str]:
        query = {"timestamps": "true", "follow": "true"}
        if tail is not None:
            query["tailLines"] = str(tail)
        lines: Iterator[str] = self._call("get", "pods/log", namespace, self.api.stream_lines,
                                          core_path(namespace, "pods", pod) + "/log", query)
        try:
            yield from lines  # the request is sent on the first read: its errors arrive here
        except KubeApiError as error:
            raise self.translate(error, "get", "pods/log", namespace) from None
        except urllib3.exceptions.HTTPError:
            return  # the stream ended with the pod (or the connection): the caller looks again

    # -- the plan pod ---------------------------------------------------------------------------

    def create_pod(self, namespace: str, pod: Mapping[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self._call("create", "pods", namespace, self.api.create, core_path(namespace, "pods"), pod)
        return created

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("get", "pods", namespace, self.api.get, core_path(namespace, "pods", name))
        return found

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self._call("delete", "pods", namespace, self.api.request, "DELETE", core_path(namespace, "pods", name),
                       {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
        except PluginError as error:
            if error.code is not Exit.NOT_FOUND:
                raise

    def version(self) -> dict[str, Any]:
        found: dict[str, Any] = self._call("get", "/version", None, self.api.get, "/version")
        return found
