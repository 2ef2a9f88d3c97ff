"""The ``Backfill`` CustomResourceDefinition, generated from the pydantic model (PURE).

``backfill crd`` prints it; ``crds/backfill.dev_backfills.yaml`` is its committed output (a test
keeps them equal). The pydantic JSON schema is turned into a Kubernetes *structural* schema:
``$ref`` inlined, ``anyOf [X, null]`` reduced to ``X`` (optional fields are simply omitted),
``title`` and ``additionalProperties: false`` dropped (the API server prunes unknown fields; the
operator re-validates with the model and reports unknown fields as ``InvalidSpec``), free-form
maps marked ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import yaml
from pydantic import TypeAdapter

from backfill_worker.api import (
    API_GROUP,
    API_VERSION,
    IMMUTABLE_SPEC_FIELDS,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    Backfill,
    BackfillSpec,
)
from backfill_worker.durations import DURATION_PATTERN, format_duration

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CEL_INVISIBLE_FIELDS = ("key",)
_TIMEDELTA = TypeAdapter(timedelta)
_DROP = ("title", "additionalProperties")


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s and reduce optional unions; the field's own keys win over the target's."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        node = {**target, **node}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**_resolve(branches[0], defs), **rest}
            if node.get("default", "") is None:
                node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        elif key == "default" and node.get("pattern") == DURATION_PATTERN and isinstance(value, str):
            # pydantic renders timedelta defaults as ISO 8601 ("PT0.2S"); the API speaks "200ms".
            out[key] = format_duration(_TIMEDELTA.validate_python(value))
        else:
            out[key] = _resolve(value, defs)
    if out.get("additionalProperties") == {} or (
        out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out
    ):
        # dict[str, Any]: a free-form object (securityContext and the like).
        out.pop("additionalProperties", None)
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "description" in out:
        out["description"] = " ".join(out["description"].replace("``", "`").split())
    return out


def _immutability_rules() -> list[dict[str, str]]:
    """CEL transition rules (Kubernetes >= 1.25; older servers drop them, the operator enforces too).

    Written at the spec level so that adding or removing an optional field is caught as well.
    Not for ``key``: it has no schema type (string or list), and CEL cannot see untyped fields
    (a rule naming it would not compile and the server would refuse the whole CRD).
    """
    rules = []
    for field in IMMUTABLE_SPEC_FIELDS:
        if field in CEL_INVISIBLE_FIELDS:
            continue
        rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
        rules.append({
            "rule": rule,
            "message": f"spec.{field} is immutable once created: revert it, or create a new Backfill (new name) for a different change",
        })
    return rules


def spec_schema() -> dict[str, Any]:
    raw = BackfillSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _resolve(raw, defs)
    # `key` accepts a column name or a list of them; a structural schema cannot say "string or
    # array", so the field is free-form here and checked by the operator (InvalidSpec).
    schema["properties"]["key"] = {
        "description": schema["properties"]["key"].get("description", ""),
        "x-kubernetes-preserve-unknown-fields": True,
    }
    for prop in schema["properties"].values():
        # `default: {}` lets the API server fill the nested defaults of an omitted section
        # (batch, limits, checkpoint, worker), so `kubectl get -o yaml` shows the effective settings.
        if prop.get("type") == "object" and "properties" in prop and "default" not in prop:
            prop["default"] = {}
    schema["x-kubernetes-validations"] = _immutability_rules()
    return schema


def _impact_status_schema() -> dict[str, Any]:
    number = {"type": "number"}
    return {
        "type": "object",
        "description": "What the application-impact throttle (spec.limits.applicationImpact) is doing and why.",
        "properties": {
            "summary": {"type": "string", "description": "e.g. 'duty 35% (throughput 1.10)'"},
            "applicationPresent": {"type": "boolean"},
            "dutyPercent": number, "pressure": number,
            "limitedBy": {"type": "string", "description": "throughput, latency, activeSessions, lockWaits or empty"},
            "pauseMs": number, "batchTargetMs": number, "throughputRatio": number,
            "appTransactionsPerSecond": number, "baselineTransactionsPerSecond": number,
            "activeSessions": number, "lockWaiters": {"type": "integer"}, "walBytesPerSecond": number,
            "statementMs": number,
        },
    }


def _shard_status_schema() -> dict[str, Any]:
    integer = {"type": "integer"}
    number = {"type": "number"}
    string = {"type": "string"}
    return {
        "type": "object",
        "description": "Progress of one key-range shard, written by its worker.",
        "properties": {
            "state": {"type": "string", "enum": ["pending", "running", "paused", "done", "failed"]},
            "lastKey": {"type": "array", "items": string, "description": "Checkpoint mirror: last key processed."},
            "rowsUpdated": integer, "batches": integer, "batchSize": integer,
            "rowsPerSecond": number, "percent": integer, "etaSeconds": number,
            "throttleReason": string, "lastError": string, "lastErrorReason": string,
            "remainingMatches": integer, "estimatedKeys": integer, "keysDone": integer,
            "run": integer, "updatedAt": string, "impact": _impact_status_schema(),
            "checkpoint": {
                "type": "string",
                "description": "checkpoint.mode atLeastOnce only: the shard's progress record as JSON (kept here, not in the database).",
            },
        },
    }


def _condition_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }


def status_schema() -> dict[str, Any]:
    integer = {"type": "integer"}
    string = {"type": "string"}
    return {
        "type": "object",
        "description": "Written by the operator and the workers; the database checkpoint is the source of truth.",
        "properties": {
            "phase": {"type": "string", "enum": ["Pending", "Running", "Paused", "Succeeded", "Failed"]},
            "observedGeneration": integer,
            "message": string,
            "conditions": {
                "type": "array",
                "items": _condition_schema(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "progress": {
                "type": "object",
                "properties": {
                    "rowsUpdated": integer, "batches": integer,
                    "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                    "rowsPerSecond": {"type": "number"}, "eta": string, "batchSize": integer,
                    "throttleReason": string, "impact": _impact_status_schema(),
                },
            },
            "shards": {"type": "object", "additionalProperties": _shard_status_schema()},
            "jobNames": {"type": "array", "items": string},
            "run": {"type": "integer", "description": "Launch counter: worker Jobs are named <name>-s<shard>-r<run>."},
            "startedAt": string,
            "completedAt": string,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "percent of keys done"},
    {"name": "Rows", "type": "integer", "jsonPath": ".status.progress.rowsUpdated"},
    {"name": "Rate", "type": "number", "jsonPath": ".status.progress.rowsPerSecond", "description": "rows per second"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Table", "type": "string", "jsonPath": ".spec.table", "priority": 1},
    {"name": "Batch", "type": "integer", "jsonPath": ".status.progress.batchSize", "priority": 1},
    {"name": "Throttle", "type": "string", "jsonPath": ".status.progress.throttleReason", "priority": 1},
    {"name": "Impact", "type": "string", "jsonPath": ".status.progress.impact.summary", "priority": 1,
     "description": "application-impact throttle: duty cycle and the limiting signal"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    spec = spec_schema()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "backfill-operator"}},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                "singular": SINGULAR, "shortNames": list(SHORT_NAMES),
            },
            "scope": "Namespaced",
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": " ".join((Backfill.__doc__ or "").replace("``", "`").split()),
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def without_cel(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD minus ``x-kubernetes-validations`` (what a < 1.25 API server keeps anyway)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(crd)


class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-dicts are written out in full: anchors would be unreadable in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd_yaml() -> str:
    header = "# Generated by `backfill crd` from backfill_worker/api.py. Do not edit by hand.\n"
    return header + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=120)
