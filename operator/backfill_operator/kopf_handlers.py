"""The thin I/O layer: kopf triggers -> observe -> ``reconcile.reconcile`` -> apply the plan.

kopf provides the watch of Backfills (``on.event``) and nothing else: no finalizers, no
annotations of its own, so deleting a Backfill never waits for the operator and owner
references garbage-collect its Jobs. Jobs come from an informer of our own (``informer.py``:
one LIST, then a WATCH). Every read a pass makes comes from those two caches: the body kopf
last delivered (or the operator's own last write, whichever is newer) and the Job index. A
resync loop re-runs every known Backfill every few seconds from the caches (status changes are
invisible to kopf's diff handlers, heartbeats age, and level-triggered passes survive missed
events), so at rest the operator makes no requests at all. One lock per Backfill serialises
the watch handler and the resync loop, so two passes never race to create a Job.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kopf
import urllib3

from backfill_api.kubeapi import KubeApi, KubeApiError, backfill_path, core_path, jobs_path
from backfill_api.model import API_GROUP, API_VERSION, KIND, PLURAL, BackfillSpec, SecretKeyRef
from backfill_api.specdiff import decode_applied, effective_spec
from backfill_api.status import StallReason

from . import jobs as jobs_mod
from .event_recorder import EventCorrelator
from .informer import Informer, JobStore, is_older
from .metrics import OperatorMetrics
from .reconcile import EventSpec, Observed, Plan, SecretCheck, reconcile, status_patch

log = logging.getLogger("backfill.operator")


class JobNameTaken(Exception):
    """A Job with the deterministic name exists but another owner's: never adopt or touch it."""


class NotLeader(Exception):
    """The leader Lease lapsed during a pass: the rest of the pass is the new leader's."""


class JobRejected(Exception):
    """The API server refused the Job (422 invalid pod settings, 403 quota or admission)."""


TOMBSTONES = 65536
SECRET_RECHECK_SECONDS = 10.0


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(jobs: list[dict[str, Any]]) -> set[str]:
    return {str(j.get("metadata", {}).get("name")) for j in jobs}


class Controller:
    def __init__(
        self,
        api: KubeApi,
        *,
        defaults: jobs_mod.WorkerDefaults = jobs_mod.DEFAULT_WORKER,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.api = api
        self.defaults = defaults
        self.metrics = metrics or OperatorMetrics()
        self.known: dict[str, dict[str, Any]] = {}
        """uid -> latest body seen, for the resync loop."""
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._gone: OrderedDict[str, None] = OrderedDict()
        """uids of deleted Backfills (see ``remember``)."""
        self._stopped = threading.Event()
        self._server: jobs_mod.ServerCapabilities | None = None
        self._posted: set[str] = set()
        """Keys of keyed events posted by this process (a restarted one gets 409 instead)."""
        self.correlator = EventCorrelator()
        self._secret_failures: dict[tuple[str, str, str], tuple[float, SecretCheck]] = {}
        self.jobs = JobStore()
        """The operator's Jobs, fed by the informers ``main`` starts."""
        self.jobs_synced: Callable[[], bool] = lambda: True
        """No pass before every Job informer has listed once: an unseen Job would be re-created."""
        self.active: Callable[[], bool] = lambda: True
        """Leader election's verdict: a standby keeps its caches warm and writes nothing."""

    def remember(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Keep the newest version of a Backfill: a queued watch event may be older than our own write.

        None for a deleted one: a late event (or a pass finishing after the delete) must not bring
        it back, or the resync loop would follow, from the cache, a Backfill that no longer exists.
        """
        uid = str(body.get("metadata", {}).get("uid") or "")
        with self._guard:
            if uid in self._gone:
                return None
            current = self.known.get(uid)
            if is_older(body, current):
                return current
            self.known[uid] = dict(body)
            return self.known[uid]

    def stop(self) -> None:
        """No new passes (an in-flight one finishes); called when the operator shuts down."""
        self._stopped.set()

    # -- triggers ---------------------------------------------------------------------------

    def observe_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        uid = str(body.get("metadata", {}).get("uid") or "")
        if not uid:
            return
        if event_type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
            self.forget(uid)  # its Jobs go with it (owner references)
            return
        remembered = self.remember(body)
        if remembered is not None:
            self.reconcile_one(remembered)

    def forget(self, uid: str) -> None:
        """A deleted Backfill: uids are never reused, so its tombstone is kept (a bounded number)."""
        with self._guard:
            self.known.pop(uid, None)
            self._locks.pop(uid, None)
            self._gone[uid] = None
            while len(self._gone) > TOMBSTONES:
                self._gone.popitem(last=False)

    def resync(self) -> None:
        if not (self.jobs_synced() and self.active()):
            return
        for body in list(self.known.values()):
            if self._stopped.is_set():
                return
            if (body.get("status") or {}).get("phase") == "Succeeded":
                continue  # terminal: nothing to follow; a watch event still reconciles it
            self.reconcile_one(body)
        self.metrics.set_phases((b.get("status") or {}).get("phase") for b in self.known.values())

    # -- one pass ---------------------------------------------------------------------------

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def reconcile_one(self, body: Mapping[str, Any]) -> Plan | None:
        meta = body.get("metadata", {})
        uid, name, namespace = str(meta.get("uid")), str(meta.get("name")), str(meta.get("namespace"))
        if self._stopped.is_set() or not self.jobs_synced() or not self.active():
            return None  # the resync loop comes back once the Job index is complete (and we lead)
        with self._lock(uid):
            fresh = self.known.get(uid)
            if fresh is None:
                return None  # deleted meanwhile
            try:
                plan = self._reconcile(fresh)
            except NotLeader:
                log.info("reconcile of %s/%s stopped: leadership lost", namespace, name)
                return None
            except KubeApiError as error:
                if error.status == 404:
                    self.forget(uid)
                    return None
                self.metrics.reconciles.labels("error").inc()
                self.metrics.errors.labels("api").inc()
                log.warning("reconcile of %s/%s failed: %s", namespace, name, error)
                return None
            except (OSError, urllib3.exceptions.HTTPError) as error:  # API unreachable: the next pass retries
                self.metrics.reconciles.labels("error").inc()
                self.metrics.errors.labels("api").inc()
                log.warning("reconcile of %s/%s failed: API unreachable (%s)", namespace, name, type(error).__name__)
                return None
            except Exception:
                self.metrics.reconciles.labels("error").inc()
                self.metrics.errors.labels("unexpected").inc()
                log.exception("reconcile of %s/%s failed unexpectedly", namespace, name)
                return None
            self.metrics.reconciles.labels("ok").inc()
            return plan

    def server(self) -> jobs_mod.ServerCapabilities:
        """The API server's Job features, from ``/version`` (read once; unreadable: 1.20's)."""
        if self._server is not None:
            return self._server
        try:
            version = self.api.get("/version")
        except KubeApiError as error:  # the server answered: it has no readable version
            log.warning("could not read the API server's version (%s): using plain Jobs", error.status)
            version = {}
        except (OSError, urllib3.exceptions.HTTPError) as error:  # unreachable: ask again next pass
            log.warning("could not read the API server's version (%s): plain Jobs this pass", type(error).__name__)
            return jobs_mod.BASELINE
        self._server = jobs_mod.server_capabilities(version)
        log.info("API server %s: %s", version.get("gitVersion", "?"), self._server)
        return self._server

    def worker_pods(self, namespace: str, name: str, jobs: list[dict[str, Any]], phase: Any) -> list[dict[str, Any]]:
        """Worker pods, only when a Job counts failed ones and the run is not over (why they died)."""
        if phase == "Failed" or not jobs_mod.has_failed_pods(jobs):
            return []
        try:
            return self.api.list(core_path(namespace, "pods"), jobs_mod.selector_labels(name))
        except KubeApiError as error:
            if error.status not in (403, 404):
                raise
            # An older chart's RBAC without pods: the status names the Job's failure, not the OOM.
            log.warning("cannot list worker pods in %s (%s): OOM kills will not be named", namespace, error.status)
            return []

    def _reconcile(self, body: dict[str, Any]) -> Plan:
        meta = body.get("metadata", {})
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        jobs = self.jobs.for_backfill(namespace, jobs_mod.selector_labels(name)[jobs_mod.LABEL_NAME])
        status = body.get("status") or {}
        observed = Observed(
            name=name, namespace=namespace, uid=uid, generation=meta.get("generation"),
            raw_spec=body.get("spec") or {}, annotations=meta.get("annotations") or {},
            status=status, jobs=jobs, now=utcnow(),
            pods=self.worker_pods(namespace, name, jobs, status.get("phase")), server=self.server(),
        )
        plan = reconcile(observed, self.defaults)
        if plan.needs_secret:
            # The Secret the Jobs will use: from the applied spec when a run already started.
            spec_for_jobs = effective_spec(body.get("spec") or {}, decode_applied(observed.annotations))
            observed = replace(observed, secret=self.check_secret(namespace, spec_for_jobs))
            plan = reconcile(observed, self.defaults)
        if plan.create_jobs:
            # A launch is the one decision a lagging cache could get wrong (a Job not seen yet, e.g.
            # just after a leader handover, would be launched again as the next run): read live first.
            label = jobs_mod.selector_labels(name)[jobs_mod.LABEL_NAME]
            live = self.api.list(jobs_path(namespace), jobs_mod.selector_labels(name))
            if _names(live) != _names(jobs):
                log.info("Job cache of %s/%s was behind the server: deciding again", namespace, name)
                self.jobs.replace_for(namespace, label, live)
                observed = replace(observed, jobs=live)
                plan = reconcile(observed, self.defaults)
        if plan.annotations:
            # Before any Job exists: workers read the applied spec from here.
            self.remember(self.api.merge_patch(backfill_path(namespace, name), {"metadata": {"annotations": plan.annotations}}))
        try:
            for job in plan.create_jobs:
                self._create_job(namespace, uid, job)
        except JobNameTaken as conflict:
            plan = reconcile(replace(observed, secret=SecretCheck(True), job_conflict=str(conflict)), self.defaults)
            plan = replace(plan, create_jobs=[], delete_jobs=[])
        except JobRejected as rejected:
            # Tried again every pass: it converges once the spec (or the quota) is fixed.
            plan = reconcile(replace(observed, secret=SecretCheck(True), job_rejected=str(rejected)), self.defaults)
            plan = replace(plan, create_jobs=[], delete_jobs=[])
        for job_name in plan.delete_jobs:
            try:
                self.api.delete(jobs_path(namespace, job_name))
            except KubeApiError as error:
                if error.status != 404:
                    raise
            self.jobs.remove(namespace, job_name)
        patch = status_patch(body.get("status") or {}, plan.status)
        if patch:
            self.remember(self.api.merge_patch(backfill_path(namespace, name, status=True), {"status": patch}))
        for event in plan.events:
            self.post_event(body, event)
        return plan

    def _create_job(self, namespace: str, uid: str, job: dict[str, Any]) -> None:
        job_name = job["metadata"]["name"]
        if not self.active():  # checked right before the write: a lapsed lease creates nothing
            raise NotLeader(job_name)
        try:
            self.jobs.put(self.api.create(jobs_path(namespace), job))
            self.metrics.jobs_created.inc()
            log.info("created Job %s/%s", namespace, job_name)
        except KubeApiError as error:
            if error.status in (403, 422):
                raise JobRejected(
                    f"the API server refused worker Job {namespace}/{job_name}: {str(error)[:700]}; "
                    "fix spec.worker (or the namespace's quota or admission policy)"
                ) from None
            if error.status != 409:
                raise
            # Created by an earlier pass whose status write was lost (e.g. an operator restart):
            # adopt it, never duplicate it. Someone else's Job of that name is a hard error.
            existing = self.api.get(jobs_path(namespace, job_name))
            if not jobs_mod.owned_by(existing, uid):
                raise JobNameTaken(
                    f"Job {namespace}/{job_name} exists and does not belong to this Backfill: delete or rename it"
                ) from None
            self.jobs.put(existing)
            log.info("adopted existing Job %s/%s", namespace, job_name)

    def check_secret(self, namespace: str, raw_spec: Mapping[str, Any]) -> SecretCheck:
        """Does the DSN Secret exist and hold the key? Only existence is checked: the value is never read out.

        A failed check is reused for ``SECRET_RECHECK_SECONDS`` (per Secret and key): Backfills
        stalled on a missing Secret re-check it that often, not once per pass each.
        """
        try:
            ref = BackfillSpec.model_validate(dict(raw_spec)).database.dsn_secret_ref
        except (TypeError, ValueError):  # pydantic's ValidationError is a ValueError
            return SecretCheck(False, StallReason.INVALID_SPEC, "spec is invalid")
        if ref is None:
            return SecretCheck(
                False, StallReason.SECRET_REF_MISSING,
                "spec.database.dsnSecretRef is required in a cluster: name a Secret in this namespace holding the DSN",
            )
        key, clock = (namespace, ref.name, ref.key), time.monotonic()
        failed = self._secret_failures.get(key)
        if failed is not None and clock - failed[0] < SECRET_RECHECK_SECONDS:
            return failed[1]
        result = self._read_secret(namespace, ref)
        if result.ok:
            self._secret_failures.pop(key, None)
        else:
            self._secret_failures[key] = (clock, result)
        return result

    def _read_secret(self, namespace: str, ref: SecretKeyRef) -> SecretCheck:
        try:
            secret = self.api.get(core_path(namespace, "secrets", ref.name))
        except KubeApiError as error:
            if error.status == 404:
                return SecretCheck(
                    False, StallReason.SECRET_NOT_FOUND,
                    f"Secret {namespace}/{ref.name} (spec.database.dsnSecretRef.name) not found: create it, e.g. "
                    f"kubectl -n {namespace} create secret generic {ref.name} --from-literal={ref.key}=postgresql://...",
                )
            if error.status == 403:
                return SecretCheck(False, StallReason.SECRET_FORBIDDEN, f"the operator may not read Secret {namespace}/{ref.name}: check its RBAC")
            raise
        if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
            return SecretCheck(
                False, StallReason.SECRET_KEY_NOT_FOUND,
                f"Secret {namespace}/{ref.name} has no key {ref.key!r} (spec.database.dsnSecretRef.key): add it or fix the key",
            )
        return SecretCheck(True)

    def post_event(self, body: Mapping[str, Any], event: EventSpec) -> None:
        meta = body.get("metadata", {})
        if event.key and event.key in self._posted:
            return
        uid, clock = str(meta.get("uid") or ""), time.monotonic()
        # Rate-limited per Backfill, the way Kubernetes' recorders do it (events.py).
        decision = self.correlator.decide(uid, event.type, event.reason, event.message[:1024], clock)
        if decision.action == "drop":
            self.metrics.events_dropped.inc()
            return
        now = utcnow()
        if decision.action == "patch":
            try:
                self.api.merge_patch(core_path(meta["namespace"], "events", decision.name),
                                     {"count": decision.count, "lastTimestamp": now, "message": decision.message})
                return
            except KubeApiError as error:
                if error.status != 404:
                    log.warning("could not update event %s: %s", event.reason, error)
                    return
                self.correlator.forget(uid, event.type, event.reason, decision.message)  # expired: create anew
        # A keyed event has a name of its own: posting it again (another pass, a restarted
        # operator) is a 409, not a second event.
        suffix = jobs_mod.fit_name(event.key, limit=60) if event.key else uuid.uuid4().hex[:16]
        name = f"{jobs_mod.fit_name(meta['name'], limit=190)}.{suffix}"
        try:
            self.api.create(core_path(meta["namespace"], "events"), {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                    "namespace": meta["namespace"], "uid": meta.get("uid"),
                },
                "reason": event.reason,
                "message": decision.message,
                "type": event.type,
                "source": {"component": "backfill-operator"},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            })
        except KubeApiError as error:  # an Event is best effort; the status holds the truth
            if not (event.key and error.status == 409):
                log.warning("could not post event %s: %s", event.reason, error)
                return  # a keyed one is tried again by the next pass
        self.correlator.posted(uid, event.type, event.reason, decision.message, name, clock)
        if event.key:
            self._posted.add(event.key)


def job_informers(controller: Controller, namespaces: tuple[str, ...]) -> list[Informer]:
    """One informer for every namespace watched, or one for the whole cluster."""
    paths = [(jobs_path(ns), ns) for ns in namespaces] if namespaces else [("/apis/batch/v1/jobs", None)]
    return [Informer(controller.api, path, controller.jobs, namespace=ns) for path, ns in paths]


def register(
    registry: kopf.OperatorRegistry, controller: Controller, *, resync_seconds: float = 3.0, namespaces: tuple[str, ...] = (),
) -> None:
    """Wire the controller into a kopf registry (one per operator instance: tests run several)."""
    informers = job_informers(controller, namespaces)
    controller.jobs_synced = lambda: all(i.synced.is_set() for i in informers)

    @kopf.on.startup(registry=registry)
    def start_informers(**_: Any) -> None:
        for informer in informers:
            threading.Thread(target=informer.run, name=f"job-informer {informer.path}", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def stop_informers(**_: Any) -> None:
        for informer in informers:
            informer.stop()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    def backfill_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        controller.observe_event(type, dict(body))

    @kopf.on.startup(registry=registry)
    async def detect_server(**_: Any) -> None:
        # Logged at startup (which Job form this server gets); a failure is retried on the first pass.
        await asyncio.get_running_loop().run_in_executor(None, controller.server)

    @kopf.on.startup(registry=registry)
    async def start_resync(memo: kopf.Memo, **_: Any) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(resync_seconds)
                try:
                    await asyncio.get_running_loop().run_in_executor(None, controller.resync)
                except Exception:  # never let one bad pass end the loop for good
                    log.exception("resync pass failed")

        memo["resync"] = asyncio.create_task(loop())

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task is not None:
            task.cancel()
