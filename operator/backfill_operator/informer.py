"""An informer for the operator's Jobs: LIST once, then WATCH, into an in-memory index.

Why not kopf's ``on.event`` for Jobs: the reconciler must not decide on an empty index (a Job
it cannot see is a Job to create, and a *new run's* Job has a new name, so that would be a
duplicate, not a harmless 409). kopf has no "initial listing done" signal; a reflector of our
own (client-go's shape) knows exactly when it has synced, filters by label on the server, and
re-lists only when the server says its resource version is too old (410).

:class:`JobStore` is the pure part (apply a listing or an event, answer by Backfill);
:class:`Informer` is the I/O loop. Writes the operator makes itself go into the store at once
(:meth:`JobStore.put` / :meth:`JobStore.remove`), so the next pass reads its own writes even
before their watch events arrive.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import urllib3

from backfill_api.kubeapi import KubeApi, KubeApiError

from .jobs import LABEL_NAME, MANAGED_BY

log = logging.getLogger("backfill.operator")

MANAGED_LABEL = "app.kubernetes.io/managed-by"
JOB_SELECTOR = f"{MANAGED_LABEL}={MANAGED_BY}"
Key = tuple[str, str]


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as a number, or None when the server's are not numbers.

    Kubernetes calls them opaque, but etcd-backed servers hand out etcd revisions; comparing
    them only guards against an event that is older than what the operator itself just wrote.
    """
    value = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(value))
    except ValueError:
        return None


def is_older(incoming: Mapping[str, Any], stored: Mapping[str, Any] | None) -> bool:
    """Whether ``incoming`` is a strictly older version than ``stored`` (unknown: not older)."""
    if stored is None:
        return False
    new, old = resource_version(incoming), resource_version(stored)
    return new is not None and old is not None and new < old


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _owner(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str((meta.get("labels") or {}).get(LABEL_NAME) or "")


class JobStore:
    """Jobs by (namespace, name), indexed by (namespace, ``backfill.dev/name`` label). Thread-safe."""

    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        self._by_owner: dict[Key, set[str]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._objects)

    def _drop(self, key: Key) -> None:
        old = self._objects.pop(key, None)
        if old is not None:
            names = self._by_owner.get(_owner(old))
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._by_owner[_owner(old)]

    def _set(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        self._drop(key)
        self._objects[key] = dict(obj)
        self._by_owner.setdefault(_owner(obj), set()).add(key[1])

    def replace(self, items: Iterable[Mapping[str, Any]], namespace: str | None = None) -> None:
        """A fresh listing (of ``namespace``, or of everything): what it lacks is gone."""
        with self._lock:
            for key in [k for k in self._objects if namespace is None or k[0] == namespace]:
                self._drop(key)
            for obj in items:
                self._set(obj)

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> bool:
        """One watch event; False when it was ignored (older than what the store holds)."""
        with self._lock:
            key = _key(obj)
            if is_older(obj, self._objects.get(key)):
                return False
            if event_type == "DELETED":
                self._drop(key)
            elif event_type in ("ADDED", "MODIFIED"):
                self._set(obj)
            else:
                return False
            return True

    def put(self, obj: Mapping[str, Any]) -> None:
        """The operator's own create: visible to the next pass before its watch event."""
        self.apply("ADDED", obj)

    def remove(self, namespace: str, name: str) -> None:
        """The operator's own delete."""
        with self._lock:
            self._drop((namespace, name))

    def replace_for(self, namespace: str, backfill_label: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A live listing of one Backfill's Jobs (read before a launch): it wins over the cache."""
        with self._lock:
            for name in list(self._by_owner.get((namespace, backfill_label), ())):
                self._drop((namespace, name))
            for obj in items:
                self._set(obj)

    def for_backfill(self, namespace: str, backfill_label: str) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self._by_owner.get((namespace, backfill_label), ()))
            objects = [self._objects[(namespace, n)] for n in names]
        # The server filters by label; some test servers do not, so the selector applies here too.
        return [o for o in objects if ((o.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY]


class Informer:
    """LIST + WATCH of one collection path into a :class:`JobStore` (run on its own thread).

    ``synced`` is set after the first complete listing and stays set: after that the store
    can lag the server by a watch event, never miss a listing.
    """

    def __init__(
        self, api: KubeApi, path: str, store: JobStore, *, namespace: str | None = None,
        selector: str = JOB_SELECTOR, watch_seconds: int = 300, backoff: float = 1.0,
    ) -> None:
        self.api, self.path, self.store, self.namespace = api, path, store, namespace
        self.selector, self.watch_seconds, self.backoff = selector, watch_seconds, backoff
        self.synced = threading.Event()
        self.stopped = threading.Event()
        self.lists = 0
        """How many LISTs this informer made (tests: re-listing must be rare)."""
        self._response: Any = None

    def _opened(self, response: Any) -> None:
        self._response = response

    def stop(self) -> None:
        self.stopped.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # wakes the blocked read; the loop then sees ``stopped``
            except (OSError, AttributeError):  # already closed
                pass

    def _list(self) -> str:
        listing = self.api.request("GET", self.path, query={"labelSelector": self.selector})
        self.lists += 1
        self.store.replace(listing.get("items") or [], self.namespace)
        self.synced.set()
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> Iterator[dict[str, Any]]:
        query = {"labelSelector": self.selector, "watch": "true", "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(self.watch_seconds)}
        if version:
            query["resourceVersion"] = version
        return self.api.stream(self.path, query, read_timeout=self.watch_seconds + 30, opened=self._opened)

    def run(self) -> None:
        version = ""
        while not self.stopped.is_set():
            try:
                if not version:
                    version = self._list()
                for event in self._watch(version):
                    if self.stopped.is_set():
                        return
                    kind, obj = str(event.get("type")), event.get("object") or {}
                    if kind == "ERROR":
                        # 410 Gone: our version is older than the server keeps; anything else: same cure.
                        log.info("job watch ended by the server (%s): listing again", obj.get("code"))
                        version = ""
                        break
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind != "BOOKMARK":
                        self.store.apply(kind, obj)
            except KubeApiError as error:
                log.warning("job informer: %s", error)
                version = "" if error.status == 410 else version
                self.stopped.wait(self.backoff)
            except (OSError, ValueError, urllib3.exceptions.HTTPError) as error:  # dropped stream: watch again
                log.info("job watch interrupted (%s): watching again", type(error).__name__)
                self.stopped.wait(self.backoff)
