"""A small synchronous Kubernetes REST client speaking plain JSON dicts.

Built on the official ``kubernetes`` package for what it does well (kubeconfig, in-cluster
service-account credentials, TLS and token refresh); requests go out as raw JSON so that merge
patches are explicit (``application/merge-patch+json``) and responses stay dicts that the pure
modules can read. Error messages carry the API's ``Status.message``, never request bodies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn
from urllib.parse import quote

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from .model import API_GROUP, API_VERSION, PLURAL

MERGE_PATCH = "application/merge-patch+json"
BACKFILLS = f"/apis/{API_GROUP}/{API_VERSION}"


class KubeApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"Kubernetes API {status} {reason}: {message}")


def load_configuration(kubeconfig: str | None = None, *, server: str | None = None) -> k8s_client.Configuration:
    """``server`` (tests: an unauthenticated URL) > ``kubeconfig``/``$KUBECONFIG`` > in-cluster."""
    configuration = k8s_client.Configuration()
    if server:
        configuration.host = server.rstrip("/")
        return configuration
    if kubeconfig or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)
    return configuration


class KubeApi:
    def __init__(self, configuration: k8s_client.Configuration, *, timeout: float = 30.0):
        self.configuration = configuration
        self._client = k8s_client.ApiClient(configuration)
        self._timeout = timeout

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, *, server: str | None = None) -> KubeApi:
        return cls(load_configuration(kubeconfig, server=server))

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> dict[str, Any]:
        response = self._send(method, path, body, content_type=content_type, query=query, accept=accept)
        raw = response.read() or b""
        if not 200 <= response.status <= 299:
            _raise_for(response.status, str(response.reason), raw)
        data: dict[str, Any] = _json_body(raw)
        return data

    def _send(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
        query: Mapping[str, str] | None = None, accept: str = "application/json", timeout: Any = None,
    ) -> Any:
        headers = {"Accept": accept, "Content-Type": content_type}
        _, url, headers, _, _ = self._client.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers,
            auth_settings=["BearerToken"],
        )
        # A dict body is JSON-encoded by the REST layer (for every */json and *+json content type).
        return self._client.call_api(method, url, header_params=headers, body=body,
                                     _request_timeout=timeout if timeout is not None else self._timeout)

    def text(self, path: str, query: Mapping[str, str] | None = None) -> str:
        """A plain-text GET (a pod's log)."""
        response = self._send("GET", path, query=query, accept="*/*")
        raw = response.read() or b""
        if not 200 <= response.status <= 299:
            _raise_for(response.status, str(response.reason), raw)
        return bytes(raw).decode(errors="replace")

    def stream_lines(self, path: str, query: Mapping[str, str] | None = None) -> Iterator[str]:
        """A plain-text GET read line by line as it arrives (``follow=true`` logs); no read timeout."""
        response = self._send("GET", path, query=query, accept="*/*", timeout=(self._timeout, None))
        if not 200 <= response.status <= 299:
            _raise_for(response.status, str(response.reason), response.read() or b"")
        raw = response.response  # the urllib3 response, not yet read
        try:
            for line in _lines(raw, 4096, keep_last=True):
                yield line.decode(errors="replace")
        finally:
            raw.release_conn()

    def stream(
        self, path: str, query: Mapping[str, str], *, read_timeout: float, opened: Callable[[Any], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """A watch: one decoded JSON document per line until the server ends the response.

        ``opened`` receives the urllib3 response: its ``shutdown()`` ends a blocked read from
        another thread (how a stopping operator ends its watches at once).
        """
        response = self._send("GET", path, query=query, timeout=(10.0, read_timeout))
        raw = response.response  # the urllib3 response, not read yet
        if opened is not None:
            opened(raw)
        try:
            if not 200 <= response.status <= 299:
                data = json.loads(raw.data or b"{}")
                raise KubeApiError(response.status, str(data.get("reason") or response.reason), str(data.get("message") or ""))
            for line in _lines(raw, 65536, keep_last=False):
                if line.strip():
                    yield json.loads(line)
        finally:
            raw.release_conn()

    # -- conveniences ------------------------------------------------------------------------

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def list(self, path: str, label_selector: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in label_selector.items())} if label_selector else None
        items = self.request("GET", path, query=query).get("items") or []
        # Selectors are also applied here: some test servers ignore them.
        if label_selector:
            items = [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in label_selector.items())]
        return items

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def delete(self, path: str, *, propagation: str = "Background") -> dict[str, Any]:
        return self.request("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {"message": raw[:200].decode(errors="replace")}
    return data if isinstance(data, dict) else {}


def _raise_for(status: int, reason: str, raw: bytes) -> NoReturn:
    """The API's ``Status.message`` (never the request body) in a KubeApiError."""
    data = _json_body(raw)
    raise KubeApiError(status, str(data.get("reason") or reason), str(data.get("message") or ""))


def backfill_path(namespace: str, name: str | None = None, *, status: bool = False) -> str:
    path = f"{BACKFILLS}/namespaces/{quote(namespace)}/{PLURAL}"
    if name is not None:
        path += f"/{quote(name)}"
    return path + ("/status" if status else "")


def jobs_path(namespace: str, name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs" + (f"/{quote(name)}" if name else "")


def core_path(namespace: str, plural: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/{plural}" + (f"/{quote(name)}" if name else "")


def _lines(raw: Any, chunk_size: int, *, keep_last: bool) -> Iterator[bytes]:
    """The lines of a streamed urllib3 response as they arrive; an unterminated last line too
    when ``keep_last`` (a log's), not for a watch (whose documents each end with a newline)."""
    pending = b""
    for chunk in raw.stream(chunk_size, decode_content=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if keep_last and pending:
        yield pending
