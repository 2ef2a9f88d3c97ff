"""The ``Backfill`` CustomResourceDefinition, generated from the pydantic models (PURE).

The spec schema comes from ``BackfillSpec``, the status schema from ``BackfillStatus``, the
printer columns' types from those schemas.

``backfill crd`` prints it; ``crds/backfill.dev_backfills.yaml`` is its committed output (a test
keeps them equal). The pydantic JSON schema is turned into a Kubernetes *structural* schema:
``$ref`` inlined, ``anyOf [X, null]`` reduced to ``X`` (optional fields are simply omitted),
``title`` and ``additionalProperties: false`` dropped (the API server prunes unknown fields; the
operator re-validates with the model and reports unknown fields as ``InvalidSpec``), free-form
maps marked ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

import yaml
from pydantic import TypeAdapter

from .durations import DURATION_PATTERN, format_duration
from .model import (
    API_GROUP,
    API_VERSION,
    IMMUTABLE_SPEC_FIELDS,
    KIND,
    KIND_FIELDS,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    Backfill,
    BackfillSpec,
)
from .status import BackfillStatus

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
        elif (key == "default" and node.get("pattern") == DURATION_PATTERN and isinstance(value, str)
              and not re.fullmatch(DURATION_PATTERN, value)):  # an optional object's fields pass here twice
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
    schema: dict[str, Any] = _resolve(raw, defs)
    # `key` accepts a column name or a list of them; a structural schema cannot say "string or
    # array", so the field is free-form here and checked by the operator (InvalidSpec).
    schema["properties"]["key"] = {
        "description": schema["properties"]["key"].get("description", ""),
        "x-kubernetes-preserve-unknown-fields": True,
    }
    # Sections that are absent unless given (delete, copy, handler, schedule): a default would make them present.
    optional = {field.alias or name for name, field in BackfillSpec.model_fields.items() if field.default is None}
    for name, prop in schema["properties"].items():
        # `default: {}` lets the API server fill the nested defaults of an omitted section
        # (batch, limits, checkpoint, worker), so `kubectl get -o yaml` shows the effective settings.
        # Never for a kind of change (delete, copy): its presence is what says what the backfill does.
        if name in KIND_FIELDS or name in optional:
            continue
        # Not for a section with required fields: {} would be invalid.
        if prop.get("type") == "object" and "properties" in prop and "default" not in prop and "required" not in prop:
            prop["default"] = {}
    schema["x-kubernetes-validations"] = [*_immutability_rules(), *_consistency_rules()]
    # Exactly one kind of change (no CEL: a plain structural `oneOf`, checked by every API server).
    schema["oneOf"] = [{"required": [name]} for name in KIND_FIELDS]
    return schema


def _consistency_rules() -> list[dict[str, str]]:
    """Cross-field rules the model checks too, refused at admission where the server runs CEL.

    Constant cost: each reads two scalar fields (``key`` is invisible to CEL, so "walk: ctid takes
    no key" is the operator's check alone).
    """
    return [{
        "rule": "!has(self.walk) || self.walk != 'ctid' || has(self.where)",
        "message": "walk: ctid needs spec.where, a predicate the change makes false (docs/ctid.md)",
    }]


def status_schema() -> dict[str, Any]:
    """The status schema from ``BackfillStatus``, minus defaults.

    A default in a status schema would be filled in by the API server, and the status has a
    rule of its own: a missing field reads as empty (``for_merge_patch`` sends ``""`` as null).
    """
    raw = BackfillStatus.model_json_schema(by_alias=True, mode="serialization")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _without_defaults(_resolve(raw, defs))
    return schema


def _without_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _column(name: str, json_path: str, *, description: str | None = None, priority: int | None = None) -> dict[str, Any]:
    """A printer column whose type is read from the generated schema (a typo fails at import)."""
    node: dict[str, Any] = {"properties": {"spec": spec_schema(), "status": status_schema()}}
    if json_path == ".metadata.creationTimestamp":
        kind = "date"
    else:
        for part in json_path.lstrip(".").split("."):
            node = node["properties"][part]
        kind = str(node["type"])
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": json_path}
    if description is not None:
        column["description"] = description
    if priority is not None:
        column["priority"] = priority
    return column


PRINTER_COLUMNS = [
    _column("Phase", ".status.phase"),
    _column("Progress", ".status.progress.percent", description="percent of keys done"),
    _column("Rows", ".status.progress.rowsUpdated"),
    _column("Rate", ".status.progress.rowsPerSecond", description="rows per second"),
    _column("ETA", ".status.progress.eta"),
    _column("Age", ".metadata.creationTimestamp"),
    _column("Estimate", ".status.estimate.duration",
            description="the whole run's expected duration, from the plan's timed sample batch (an estimate)"),
    _column("Table", ".spec.table", priority=1),
    _column("Batch", ".status.progress.batchSize", priority=1),
    _column("Throttle", ".status.progress.throttleReason", priority=1,
            description="why the run waits: a ThrottleReason (window, healthQuery, maxWalBytesPerSecond, ...)"),
    _column("Next-Window", ".status.progress.nextWindowStart", priority=1,
            description="outside spec.schedule: when the next run window opens"),
    _column("Impact", ".status.progress.impact.summary", priority=1,
            description="application-impact throttle: duty cycle and the limiting signal"),
    _column("Message", ".status.message", priority=1),
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
    stripped: dict[str, Any] = strip(crd)
    return stripped


class _NoAliasDumper(yaml.SafeDumper):
    """Shared sub-dicts are written out in full: anchors would be unreadable in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd_yaml() -> str:
    header = "# Generated by `backfill crd` from backfill_api/model.py and status.py. Do not edit by hand.\n"
    return header + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=120)
