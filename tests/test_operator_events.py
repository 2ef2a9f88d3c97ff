"""The per-object Event rate limit (client-go's EventCorrelator rules), on a manual clock."""

from __future__ import annotations

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from kube_support.waiting import call, eventually_async
from manifests import backfill_document

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_operator.event_recorder import (
    AGGREGATE_MAX_EVENTS,
    AGGREGATE_WINDOW_SECONDS,
    COMBINED,
    SPAM_BURST,
    SPAM_REFILL_SECONDS,
    EventCorrelator,
)
from backfill_operator.main import OperatorConfig


def post(c: EventCorrelator, obj: str, message: str, now: float, reason: str = "Retrying") -> str:
    """Decide, and play the caller: a created Event is recorded under a name of its own."""
    decision = c.decide(obj, "Warning", reason, message, now)
    if decision.action == "create":
        c.posted(obj, "Warning", reason, decision.message, f"{obj}.{now}", now)
    return decision.action


def test_identical_events_are_counted_on_one_event_not_created_again() -> None:
    c = EventCorrelator()
    assert post(c, "a", "shard 0 retries", 0.0) == "create"
    second = c.decide("a", "Warning", "Retrying", "shard 0 retries", 1.0)
    assert (second.action, second.name, second.count) == ("patch", "a.0.0", 2)
    assert c.decide("a", "Warning", "Retrying", "shard 0 retries", 2.0).count == 3
    # Another object, or the same one after the window: a new Event.
    assert post(c, "b", "shard 0 retries", 3.0) == "create"
    assert post(c, "a", "shard 0 retries", 2.0 + AGGREGATE_WINDOW_SECONDS + 1) == "create"


def test_many_different_messages_are_combined_into_one_event() -> None:
    c = EventCorrelator()
    actions = [post(c, "a", f"attempt {i}", float(i)) for i in range(AGGREGATE_MAX_EVENTS)]
    assert actions == ["create"] * AGGREGATE_MAX_EVENTS
    combined = c.decide("a", "Warning", "Retrying", "attempt 10", 10.0)
    assert combined.action == "create" and combined.message == COMBINED + "attempt 10"
    c.posted("a", "Warning", "Retrying", combined.message, "a.combined", 10.0)
    later = c.decide("a", "Warning", "Retrying", "attempt 11", 11.0)
    assert (later.action, later.name, later.message) == ("patch", "a.combined", COMBINED + "attempt 11")
    # Another reason is counted apart.
    assert post(c, "a", "started", 12.0, reason="Running") == "create"


def test_each_object_has_its_own_token_bucket() -> None:
    c = EventCorrelator()
    decisions = [c.decide("flappy", "Normal", "Phase", f"phase {i % 2}", 0.0).action for i in range(SPAM_BURST + 5)]
    assert decisions.count("drop") == 5 and "drop" not in decisions[:SPAM_BURST]
    assert c.decide("calm", "Normal", "Phase", "x", 0.0).action != "drop", "another Backfill is not limited"
    assert c.decide("flappy", "Normal", "Phase", "x", SPAM_REFILL_SECONDS / 2).action == "drop"
    assert c.decide("flappy", "Normal", "Phase", "x", SPAM_REFILL_SECONDS + 1).action != "drop", "a token comes back"
    assert c.decide("flappy", "Normal", "Phase", "y", SPAM_REFILL_SECONDS + 2).action == "drop"


def test_a_forgotten_event_is_created_again() -> None:
    c = EventCorrelator()
    post(c, "a", "m", 0.0)
    c.forget("a", "Warning", "Retrying", "m")
    assert c.decide("a", "Warning", "Retrying", "m", 1.0).action == "create"


# -- the operator's Events over real HTTP (kmock) ------------------------------------------------


@pytest.mark.kmock(cls=ApiServerEmulator)
@pytest.mark.timeout(120)
async def test_a_repeated_event_is_counted_on_the_first_one(kmock) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    ns, name = "shop", "flappy"
    await call(api.create, core_path(ns, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns},
                                                      "stringData": {"dsn": "postgresql://app@db.invalid/shop"}})
    config = OperatorConfig(namespaces=(ns,), server=str(kmock.url), metrics_port=None, resync_seconds=0.3)
    try:
        async with operator_running_async(config):
            await call(api.create, backfill_path(ns), backfill_document(name, ns, database={"dsnSecretRef": {"name": "db"}},
                                                                        table="t", set={"v": "1"}))
            for run in (1, 2):  # suspend, resume, suspend: the second "Paused" is the first one, counted twice
                await eventually_async(lambda r=run: api.get(jobs_path(ns, f"{name}-s0-r{r}")), f"run {run}'s Job")
                await call(api.merge_patch, backfill_path(ns, name), {"spec": {"suspend": True}})
                await eventually_async(lambda: api.get(backfill_path(ns, name))["status"].get("phase") == "Paused", "Paused")
                await eventually_async(lambda r=run: not api.list(jobs_path(ns)), "the Job deleted")
                if run == 1:
                    await call(api.merge_patch, backfill_path(ns, name), {"spec": {"suspend": False}})
            paused = await eventually_async(
                lambda: [e for e in api.list(core_path(ns, "events")) if e["reason"] == "Paused" and e.get("count") == 2],
                "the Paused Event counted twice")
        events = await call(api.list, core_path(ns, "events"))
    finally:
        api.close()
    assert len(paused) == 1
    assert len([e for e in events if e["reason"] == "Paused"]) == 1, "not created again"
    # Every repeat was a PATCH of the count (the "Pending" of run 2 repeats run 1's too), no create.
    patches = [r for r in kmock if r.method == "PATCH" and "/events/" in str(r.url.path)]
    assert len(patches) == sum(int(e.get("count") or 1) - 1 for e in events) >= 1
