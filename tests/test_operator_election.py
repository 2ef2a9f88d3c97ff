"""Leader election's pure decisions (acquire / renew / stand by, when to stop acting)."""

from __future__ import annotations

import pytest

from backfill_operator.election import ElectionSettings, LeaseView, decide, lease_body, still_leader

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
