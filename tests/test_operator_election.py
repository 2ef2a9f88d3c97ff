"""Leader election's pure decisions (acquire / renew / stand by, when to stop acting), and the
elector's rounds against an in-memory Lease (a release racing a round; the leader gauge)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from backfill_api.kubeapi import KubeApiError
from backfill_operator.election import ElectionSettings, LeaderElector, LeaseView, decide, lease_body, still_leader
from backfill_operator.kopf_handlers import Controller
from backfill_operator.main import elect

ME, OTHER = "pod-a_1", "pod-b_2"


def lease(holder: str, changed_at: float, duration: float = 15.0) -> LeaseView:
    return LeaseView(holder=holder, renew_time="2026-01-01T00:00:00.000000Z", duration=duration, changed_at=changed_at)


@pytest.mark.parametrize(("view", "now", "action"), [
    (None, 0.0, "acquire"),                      # no Lease yet: create it
    (lease("", 100.0), 100.0, "acquire"),        # released on a graceful shutdown: take it at once
    (lease(ME, 100.0), 100.0, "renew"),          # ours
    (lease(ME, 0.0), 1000.0, "renew"),           # ours even if we were slow: renewing is always right
    (lease(OTHER, 100.0), 100.0, "standby"),     # another's, just renewed
    (lease(OTHER, 100.0), 114.9, "standby"),     # not yet expired on our clock
    (lease(OTHER, 100.0), 115.0, "acquire"),     # unchanged for a whole lease duration: take over
    (lease(OTHER, 100.0, duration=1.0), 101.5, "acquire"),  # the holder's own (shorter) duration counts
])
def test_decide(view: LeaseView | None, now: float, action: str) -> None:
    assert decide(view, ME, now) == action


def test_the_leader_stops_acting_before_anyone_may_take_over() -> None:
    settings = ElectionSettings(namespace="ns")
    assert not still_leader(None, settings.renew_deadline, 0.0)
    assert still_leader(100.0, settings.renew_deadline, 109.9)
    assert not still_leader(100.0, settings.renew_deadline, 110.0)
    # The standby's earliest takeover (lease duration after the last renewal it saw) comes later.
    assert 100.0 + settings.renew_deadline < 100.0 + settings.lease_duration


@pytest.mark.parametrize(("retry", "renew", "duration"), [(2, 10, 10), (10, 10, 15), (0, 1, 2), (3, 2, 15)])
def test_settings_refuse_timings_that_could_overlap_two_leaders(retry: float, renew: float, duration: float) -> None:
    with pytest.raises(ValueError, match="--leader-elect-renew-deadline"):
        ElectionSettings(namespace="ns", lease_duration=duration, renew_deadline=renew, retry_period=retry)


def test_lease_bodies_acquire_renew_and_release() -> None:
    settings = ElectionSettings(namespace="ns", name="lock")
    created = lease_body(settings, ME, None)
    assert created["metadata"] == {"name": "lock", "namespace": "ns"}  # no resourceVersion: a create
    assert created["spec"]["holderIdentity"] == ME and created["spec"]["leaseDurationSeconds"] == 15
    assert created["spec"]["leaseTransitions"] == 0 and created["spec"]["acquireTime"]
    current = {"metadata": {"resourceVersion": "42"}, "spec": {**created["spec"], "holderIdentity": OTHER}}
    taken = lease_body(settings, ME, current)
    assert taken["metadata"]["resourceVersion"] == "42", "a takeover is a conditional write (409 if someone was first)"
    assert taken["spec"]["leaseTransitions"] == 1
    renewed = lease_body(settings, ME, {"metadata": {"resourceVersion": "43"}, "spec": taken["spec"]})
    assert renewed["spec"]["leaseTransitions"] == 1 and renewed["spec"]["acquireTime"] == taken["spec"]["acquireTime"]
    released = lease_body(settings, ME, {"metadata": {"resourceVersion": "44"}, "spec": renewed["spec"]}, release=True)
    assert released["spec"]["holderIdentity"] == "" and released["spec"]["leaseDurationSeconds"] == 1


class LeaseStore:
    """The Lease endpoints of an API server, in memory (resourceVersion checked: a stale PUT is a 409)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0

    def _store(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        return dict(self.lease)

    def get(self, path: str) -> dict[str, Any]:
        if self.lease is None:
            raise KubeApiError(404, "NotFound", path)
        return dict(self.lease)

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.lease is not None:
            raise KubeApiError(409, "AlreadyExists", path)
        return self._store(body)

    def request(self, method: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise KubeApiError(409, "Conflict", path)
        return self._store(body)


def test_a_round_in_flight_during_release_does_not_take_the_lease_back() -> None:
    """SIGTERM's release() (a rollout) while the election thread's round is under way: that round
    then wrote from the *released* Lease (its resourceVersion, so no 409) and named the stopping
    pod leader again; the standby waited a whole lease duration. Here release() runs in the
    middle of a round (at the round's first clock reading) and must wait for it."""
    store = LeaseStore()
    released = threading.Event()
    runner_started = threading.Event()

    def clock() -> float:
        if threading.current_thread().name == "election-round" and not runner_started.is_set():
            runner_started.set()
            threading.Thread(target=lambda: (elector.release(), released.set())).start()
            released.wait(0.5)  # before the fix the release completed here, inside the round
        return time.monotonic()

    settings = ElectionSettings(namespace="ops", retry_period=0.01, renew_deadline=5, lease_duration=6, identity=ME)
    elector = LeaderElector(store, settings, clock=clock)  # type: ignore[arg-type]
    elector.step()
    assert elector.is_leader() and store.lease is not None and store.lease["spec"]["holderIdentity"] == ME
    runner = threading.Thread(target=elector.run, name="election-round")
    runner.start()
    runner.join(5)
    assert released.wait(5) and not runner.is_alive()
    assert store.lease["spec"]["holderIdentity"] == "", "the Lease stays released"
    assert not elector.is_leader()


def test_the_leader_gauge_is_the_gate_itself_even_when_no_round_runs() -> None:
    """``backfill_operator_leader`` said 1 on a pod whose election thread was starved (50 busy
    Backfills on 2 cores) after the renew deadline had passed: it must read ``is_leader()``."""
    now = [100.0]
    store = LeaseStore()
    elector = LeaderElector(store, ElectionSettings(namespace="ops", identity=ME), clock=lambda: now[0])  # type: ignore[arg-type]
    controller = Controller(store)  # type: ignore[arg-type]
    elect(kopf.OperatorRegistry(), controller, elector)

    def gauge() -> float | None:
        return controller.metrics.registry.get_sample_value("backfill_operator_leader")

    assert gauge() == 0.0
    elector.step()
    assert gauge() == 1.0
    now[0] += ElectionSettings(namespace="ops").renew_deadline  # no round since: the verdict lapses by itself
    assert gauge() == 0.0 and not controller.active()
