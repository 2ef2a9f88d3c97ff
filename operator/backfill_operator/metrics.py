"""Prometheus metrics of the operator (served on ``--metrics-port``, default 9090).

| metric | type | labels | meaning |
|---|---|---|---|
| ``backfill_operator_reconciles_total`` | counter | ``result`` (``ok``, ``error``) | reconcile passes |
| ``backfill_operator_reconcile_errors_total`` | counter | ``kind`` (``api``, ``unexpected``) | failed reconcile passes by cause |
| ``backfill_operator_jobs_created_total`` | counter | | worker Jobs created |
| ``backfill_operator_backfills`` | gauge | ``phase`` | Backfills seen by this operator, by phase |
| ``backfill_operator_events_dropped_total`` | counter | | Events not posted (per-object rate limit) |
| ``backfill_operator_leader`` | gauge | | 1 while this replica holds the leader Lease (or runs without election); read at scrape |
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from backfill_api.status import PHASES


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter("backfill_operator_reconciles", "Reconcile passes.", ["result"], registry=self.registry)
        self.errors = Counter(
            "backfill_operator_reconcile_errors", "Failed reconcile passes by cause.", ["kind"], registry=self.registry
        )
        self.jobs_created = Counter("backfill_operator_jobs_created", "Worker Jobs created.", registry=self.registry)
        self.events_dropped = Counter(
            "backfill_operator_events_dropped", "Events not posted (per-object rate limit).", registry=self.registry
        )
        self.leader = Gauge("backfill_operator_leader", "1 while this replica is the active one.", registry=self.registry)
        self.backfills = Gauge("backfill_operator_backfills", "Backfills by phase.", ["phase"], registry=self.registry)
        for phase in (*PHASES, "Unknown"):
            self.backfills.labels(phase).set(0)

    def set_phases(self, phases: Iterable[str | None]) -> None:
        tally = Tally(p if p in PHASES else "Unknown" for p in phases)
        for phase in (*PHASES, "Unknown"):
            self.backfills.labels(phase).set(tally.get(phase, 0))
