"""Leader election on a ``coordination.k8s.io/v1`` Lease: one active replica, the others warm.

Why our own and not kopf's peering: kopf's peering is a custom resource (``KopfPeering``) that
pauses *every* replica while more than one is present and settles by priority; it is not a
Lease, it needs its own CRD, and a rolling update (two pods) would pause both. The convention
of controller-runtime, cert-manager and CloudNativePG is client-go's ``leaderelection``: a Lease
holds the leader's identity, it renews the Lease every ``retry_period``, a standby takes over
once the Lease has not changed for ``lease_duration``, and the leader stops acting when it has
not renewed for ``renew_deadline`` (< ``lease_duration``: it stops before anyone may start).

Like client-go, expiry is judged on the *local* clock from when this replica last saw the
Lease change, never by comparing its ``renewTime`` with our clock (clock skew between nodes).

:func:`decide` is the pure part; :class:`LeaderElector` does the I/O (one GET per retry on a
standby, one PUT per retry on the leader; 409 Conflict means someone else wrote first).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import urllib3

from backfill_api.kubeapi import KubeApi, KubeApiError

log = logging.getLogger("backfill.operator")

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
Action = Literal["acquire", "renew", "standby"]


@dataclass(frozen=True)
class ElectionSettings:
    namespace: str
    name: str = "backfill-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration "
                f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration}): "
                "fix --leader-elect-retry-period, --leader-elect-renew-deadline, --leader-elect-lease-duration"
            )


@dataclass(frozen=True)
class LeaseView:
    """What a replica knows of the Lease: its holder, and when (local monotonic) it last changed."""

    holder: str
    renew_time: str
    duration: float
    changed_at: float


def decide(lease: LeaseView | None, identity: str, now: float) -> Action:
    """Acquire a missing, released or expired Lease; renew our own; otherwise stand by."""
    if lease is None or not lease.holder:
        return "acquire"
    if lease.holder == identity:
        return "renew"
    if now >= lease.changed_at + lease.duration:
        return "acquire"
    return "standby"


def still_leader(renewed_at: float | None, renew_deadline: float, now: float) -> bool:
    """Act only while the last successful renewal is younger than the renew deadline."""
    return renewed_at is not None and now < renewed_at + renew_deadline


def default_identity() -> str:
    # The pod name (HOSTNAME) says which replica leads; the suffix keeps a restarted pod distinct.
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace() -> str:
    """POD_NAMESPACE (the chart sets it), else the ServiceAccount's namespace, else ``default``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(settings: ElectionSettings, identity: str, current: Mapping[str, Any] | None, *, release: bool = False) -> dict[str, Any]:
    """The Lease to write: ours (acquire/renew), or released (empty holder, as client-go's ReleaseOnCancel)."""
    spec = dict((current or {}).get("spec") or {})
    now = _micro_time()
    if release:
        spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=now)
    else:
        if spec.get("holderIdentity") != identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if spec.get("holderIdentity") else 0)
        spec.update(holderIdentity=identity, leaseDurationSeconds=int(settings.lease_duration), renewTime=now)
    metadata: dict[str, Any] = {"name": settings.name, "namespace": settings.namespace}
    if current is not None:
        metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


class LeaderElector:
    """The I/O loop around :func:`decide` (run on a thread); ``is_leader()`` is what gates writes."""

    def __init__(
        self, api: KubeApi, settings: ElectionSettings, *, on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.settings = api, settings
        self.identity = settings.identity or default_identity()
        self._on_change, self._clock = on_change, clock
        self._lease: dict[str, Any] | None = None
        self._view: LeaseView | None = None
        self._renewed_at: float | None = None
        self._leading = False
        self.stopped = threading.Event()
        self._round = threading.Lock()
        """Held by a round: release() waits for an in-flight one, which would otherwise renew
        (re-take) the Lease just after the release, from the released Lease's resourceVersion."""

    @property
    def path(self) -> str:
        return LEASES.format(namespace=self.settings.namespace)

    def is_leader(self) -> bool:
        return still_leader(self._renewed_at, self.settings.renew_deadline, self._clock())

    def _observe(self, lease: dict[str, Any] | None) -> None:
        """Remember the Lease; its change time moves only when holder or renewTime changed."""
        self._lease = lease
        if lease is None:
            self._view = None
            return
        spec = lease.get("spec") or {}
        holder, renew_time = str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or "")
        previous = self._view
        unchanged = previous is not None and (previous.holder, previous.renew_time) == (holder, renew_time)
        self._view = LeaseView(holder, renew_time, float(spec.get("leaseDurationSeconds") or self.settings.lease_duration),
                               previous.changed_at if previous is not None and unchanged else self._clock())

    def _read(self) -> None:
        try:
            self._observe(self.api.get(f"{self.path}/{self.settings.name}"))
        except KubeApiError as error:
            if error.status != 404:
                raise
            self._observe(None)

    def _write(self, *, release: bool = False) -> bool:
        body = lease_body(self.settings, self.identity, self._lease, release=release)
        try:
            if self._lease is None:
                written = self.api.create(self.path, body)
            else:
                written = self.api.request("PUT", f"{self.path}/{self.settings.name}", body)
        except KubeApiError as error:
            if error.status in (409, 404):  # someone else wrote (or deleted) first: read again next time
                self._lease = None if error.status == 404 else self._lease
                self._view = None if error.status == 404 else self._view
                return False
            raise
        self._observe(written)
        return True

    def step(self) -> None:
        """One round: read (a standby, or a leader whose write failed), decide, write."""
        started = self._clock()
        if not self._leading or self._lease is None:
            self._read()
        action = decide(self._view, self.identity, self._clock())
        if action != "standby":
            if self._write():
                self._renewed_at = started  # the lease runs from before the request, never after
            elif self._leading:
                self._read()  # a conflict on renewal: the next round decides on a fresh read
                if self._view is not None and self._view.holder != self.identity:
                    self._renewed_at = None
        self._set_leading(self.is_leader())

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("leader election: %s %s Lease %s/%s", self.identity, "holds" if leading else "does not hold",
                     self.settings.namespace, self.settings.name)
            if self._on_change is not None:
                self._on_change(leading)

    def run(self) -> None:
        while not self.stopped.is_set():
            with self._round:
                if self.stopped.is_set():
                    break
                try:
                    self.step()
                except (KubeApiError, OSError, urllib3.exceptions.HTTPError) as error:
                    # Unreachable or refused: is_leader() lapses by itself after the renew deadline.
                    log.warning("leader election round failed: %s",
                                error if isinstance(error, KubeApiError) else type(error).__name__)
                    self._set_leading(self.is_leader())
            self.stopped.wait(self.settings.retry_period)

    def release(self) -> None:
        """Graceful shutdown: stop, and hand the Lease over at once (the standby need not wait it out)."""
        self.stopped.set()
        with self._round:  # no round after this one: the released Lease stays released
            self._release()

    def _release(self) -> None:
        was_leader = self.is_leader()
        self._renewed_at = None
        self._set_leading(False)
        if not was_leader or self._lease is None:
            return
        try:
            if self._write(release=True):
                log.info("leader election: released Lease %s/%s", self.settings.namespace, self.settings.name)
        except (KubeApiError, OSError, urllib3.exceptions.HTTPError) as error:
            log.warning("could not release the Lease (%s): the standby takes over when it expires", type(error).__name__)
