"""kmock's emulator plus the few API-server behaviours our controller relies on.

kmock (0.8) stores objects as plain JSON and assigns no ``uid``, ``resourceVersion``,
``generation`` or ``creationTimestamp``. The operator needs the first (owner references) and
the third (``observedGeneration``), and kopf wants resource versions; so we add them, and
nothing more:

* CREATE: ``uid`` (uuid4), ``resourceVersion``, ``generation: 1``, ``creationTimestamp``.
* PATCH: a new ``resourceVersion``; ``generation + 1`` when the patch touches ``spec`` outside
  the ``status`` subresource (as the real server does for custom resources).

Known differences that stay (the tests do not depend on them): ``/status`` is not isolated from
the main object, PUT is not served, label selectors are ignored (our client filters again), no
schema validation or defaulting, no Job controller and no garbage collector (tests play them).
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
from kmock import KubernetesEmulator, ResourceInfo, action

_versions = itertools.count(1000)


@attrs.define(kw_only=True)
class ApiServerEmulator(KubernetesEmulator):
    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == action.CREATE:
                meta = data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = str(next(_versions))
                meta["generation"] = 1
                meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.action == action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
                if current is not None:
                    meta_patch = dict(data.get("metadata") or {})
                    meta_patch["resourceVersion"] = str(next(_versions))
                    if "spec" in data and request.subresource != "status" and data["spec"] != current.get("spec"):
                        meta_patch["generation"] = int(current.get("metadata", {}).get("generation") or 1) + 1
                    data["metadata"] = meta_patch
        return await super()._handle(request)


def declare_resources(server: KubernetesEmulator) -> None:
    """What the operator and kopf discover: our CRD's resource, Jobs, and the core kinds."""
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    server.resources["backfill.dev/v1alpha1/backfills"] = ResourceInfo(
        kind="Backfill", singular="backfill", namespaced=True, verbs=verbs, subresources={"status"}, shortnames={"bf"},
    )
    server.resources["batch/v1/jobs"] = ResourceInfo(kind="Job", singular="job", namespaced=True, verbs=verbs, subresources={"status"})
    # kopf starts watching only once core v1/namespaces is discoverable.
    server.resources["v1/namespaces"] = ResourceInfo(kind="Namespace", singular="namespace", namespaced=False, verbs=verbs)
    server.resources["v1/secrets"] = ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs=verbs)
    server.resources["v1/events"] = ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=verbs)
