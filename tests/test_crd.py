"""The CRD: generated from the model, committed, structural, and usable as a validator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from backfill_api.crd import build_crd, render_crd_yaml, without_cel
from backfill_api.manifest import parse_backfill
from backfill_api.model import IMMUTABLE_SPEC_FIELDS, KIND_FIELDS

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "backfill.dev_backfills.yaml"


def openapi_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3 schemas are a Draft 4 dialect; x-kubernetes-* keys are ignored by jsonschema.
    return jsonschema.Draft4Validator(openapi_schema())


def test_committed_crd_equals_generated():
    assert CRD_FILE.read_text() == render_crd_yaml(), "run: backfill crd > crds/backfill.dev_backfills.yaml"


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural():
    """The rules of a structural schema that the generator must guarantee."""
    schema = openapi_schema()
    for path, node in _walk(schema):
        if path.endswith("/properties") or path.endswith("x-kubernetes-validations"):
            continue
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") not in (False, True), path
        if "properties" in node or "items" in node or "additionalProperties" in node:
            assert "type" in node, f"{path} needs a type"
        if "properties" in node:
            assert "additionalProperties" not in node, path
    for path, node in _walk(schema["properties"]["spec"]):
        parent = path.rsplit("/", 1)[0]
        if parent.endswith("/properties") or path == "":
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} needs a type"


def test_crd_metadata_and_columns():
    crd = build_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["spec"]["names"]["shortNames"] == ["bf"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c for c in columns][:6] == ["Phase", "Progress", "Rows", "Rate", "ETA", "Age"]
    assert columns["Progress"]["jsonPath"] == ".status.progress.percent"
    assert columns["Estimate"]["jsonPath"] == ".status.estimate.duration" and "priority" not in columns["Estimate"]
    assert all(columns[name].get("priority") == 1 for name in ("Table", "Batch", "Throttle", "Message"))


def test_defaults_and_descriptions_come_from_the_model():
    spec = openapi_schema()["properties"]["spec"]
    batch = spec["properties"]["batch"]["properties"]
    assert batch["targetDuration"]["default"] == "200ms"  # not pydantic's ISO "PT0.2S"
    assert batch["size"] == {**batch["size"], "default": 1000, "minimum": 1, "maximum": 1_000_000}
    assert spec["properties"]["checkpoint"]["properties"]["mode"]["enum"] == ["transactional", "atLeastOnce"]
    assert "primary key" in spec["properties"]["key"]["description"]
    assert spec["required"] == ["table"]  # and exactly one of set, delete, copy, handler (oneOf below; the model)
    assert "default" not in spec["properties"]["handler"]  # an omitted handler stays omitted


def test_immutable_fields_have_cel_transition_rules():
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    spec_properties = openapi_schema()["properties"]["spec"]["properties"]
    for field in IMMUTABLE_SPEC_FIELDS:
        if "type" not in spec_properties[field]:
            # CEL cannot see an untyped field: a rule naming it would make the server refuse the CRD.
            assert not any(f"self.{field}" in r["rule"] for r in rules), field
            continue
        rule = next(r for r in rules if f"self.{field} == oldSelf.{field}" in r["rule"])
        assert f"spec.{field} is immutable" in rule["message"]
    transitions = [r for r in rules if "oldSelf" in r["rule"]]
    assert len(transitions) == len(IMMUTABLE_SPEC_FIELDS) - 1  # all but `key` (string or list; the operator enforces it)
    assert "x-kubernetes-validations" not in str(without_cel(build_crd()))


SEED = {
    "apiVersion": "backfill.dev/v1alpha1",
    "kind": "Backfill",
    "metadata": {"name": "customers-inactive", "namespace": "shop"},
    "spec": {
        "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}},
        "table": "public.customers",
        "key": "id",
        "set": {"status": "'inactive'"},
        "where": "last_login < now() - interval '365 days' AND status IS NULL",
        "batch": {"size": 1000, "targetDuration": "200ms", "minSize": 100, "maxSize": 50000, "pause": "0s"},
        "limits": {"maxRowsPerSecond": 0, "lockTimeout": "1s", "statementTimeout": "30s", "maxReplicationLag": "10s"},
        "parallelism": 1,
        "suspend": False,
        "dryRun": False,
    },
}


def _example_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = [("issue-seed", SEED)]
    for path in sorted((ROOT / "examples").rglob("*.y*ml")) + sorted((ROOT / "charts").rglob("examples/*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Backfill":
                found.append((str(path.relative_to(ROOT)), doc))
    return found


@pytest.mark.parametrize(("source", "manifest"), _example_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_example_passes_the_crd_schema_and_the_model(source, manifest):
    errors = sorted(validator().iter_errors(manifest), key=str)
    assert not errors, f"{source}: " + "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    parse_backfill(manifest, source=source)


def _with(path: str, value: Any) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(SEED)
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(parts[-1])
    else:
        node[parts[-1]] = value
    return doc


_DELETE = object()

BAD = [
    ("spec.table", _DELETE, "spec", "'table' is a required property"),
    ("spec.set", _DELETE, "spec", "is not valid under any of the given schemas"),  # none of set/delete/copy/handler
    ("spec.delete", {}, "spec", "is valid under each of"),  # set and delete together
    ("spec.handler", {"django": {"model": "a.B"}}, "spec.handler", "'callable' is a required property"),
    ("spec.handler", {"callable": "no module"}, "spec.handler.callable", "does not match"),
    ("spec.set", {}, "spec.set", "should be non-empty"),
    ("spec.set", {"status": 1}, "spec.set.status", "is not of type 'string'"),
    ("spec.table", "", "spec.table", "should be non-empty"),
    ("spec.batch.size", 0, "spec.batch.size", "less than the minimum"),
    ("spec.batch.maxSize", 2_000_000, "spec.batch.maxSize", "greater than the maximum"),
    ("spec.batch.targetDuration", "5", "spec.batch.targetDuration", "does not match"),
    ("spec.batch.pause", "1d", "spec.batch.pause", "does not match"),
    ("spec.limits.lockTimeout", "soon", "spec.limits.lockTimeout", "does not match"),
    ("spec.limits.maxRowsPerSecond", -5, "spec.limits.maxRowsPerSecond", "less than the minimum"),
    ("spec.parallelism", 0, "spec.parallelism", "less than the minimum"),
    ("spec.parallelism", 65, "spec.parallelism", "greater than the maximum"),
    ("spec.suspend", "yes", "spec.suspend", "is not of type 'boolean'"),
    ("spec.checkpoint", {"mode": "sometimes"}, "spec.checkpoint.mode", "is not one of"),
    ("spec.database.dsnSecretRef", {"key": "dsn"}, "spec.database.dsnSecretRef", "'name' is a required property"),
    ("spec.worker", {"imagePullPolicy": "Sometimes"}, "spec.worker.imagePullPolicy", "is not one of"),
    ("spec.worker", {"backoffLimit": -1}, "spec.worker.backoffLimit", "less than the minimum"),
    ("spec.worker", {"nodeSelector": {"disk": 1}}, "spec.worker.nodeSelector.disk", "is not of type 'string'"),
    ("spec", "customers", "spec", "is not of type 'object'"),
]


@pytest.mark.parametrize(("path", "value", "error_path", "message"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_manifests_fail_with_the_field_path(path, value, error_path, message):
    errors = list(validator().iter_errors(_with(path, value)))
    found = [(".".join(map(str, e.absolute_path)), e.message) for e in errors]
    assert any(p == error_path and message in m for p, m in found), found


def test_backfill_crd_command_prints_the_committed_file():
    from typer.testing import CliRunner

    from backfill_cli.app import app

    result = CliRunner().invoke(app, ["crd"])
    assert result.exit_code == 0, result.output
    assert result.stdout == CRD_FILE.read_text()


SPEC_BEFORE = {
    "database": {"dsnSecretRef": {"name": "shop-db", "key": "dsn"}}, "table": "public.customers",
    "set": {"status": "'inactive'"}, "where": "status IS NULL", "parallelism": 1,
    "checkpoint": {"schema": "backfill", "mode": "transactional"}, "batch": {"size": 1000}, "suspend": False,
}
EDITS = [
    ({"batch": {"size": 5000}}, True),
    ({"suspend": True}, True),
    ({"limits": {"maxRowsPerSecond": 100}}, True),
    ({"table": "public.other"}, False),
    ({"set": {"status": "'gone'"}}, False),
    ({"set": {"status": "'inactive'", "extra": "1"}}, False),
    ({"where": "true"}, False),
    ({"parallelism": 2}, False),
    ({"checkpoint": {"schema": "other", "mode": "transactional"}}, False),
    ({"database": {"dsnSecretRef": {"name": "other-db", "key": "dsn"}}}, False),
]


@pytest.mark.parametrize(("edit", "allowed"), EDITS, ids=[next(iter(e)) + ("-ok" if a else "-refused") for e, a in EDITS])
def test_cel_rules_evaluate_as_intended(edit, allowed):
    """Compile and run the transition rules with a CEL interpreter (servers >= 1.25 run them)."""
    import celpy

    env = celpy.Environment()
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    after = {**SPEC_BEFORE, **edit}
    activation = {"self": celpy.json_to_cel(after), "oldSelf": celpy.json_to_cel(SPEC_BEFORE)}
    results = {r["message"]: bool(env.program(env.compile(r["rule"])).evaluate(activation)) for r in rules}
    assert all(results.values()) is allowed, results


def test_cel_rules_catch_adding_or_removing_an_optional_field():
    import celpy

    env = celpy.Environment()
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    without_where = {k: v for k, v in SPEC_BEFORE.items() if k != "where"}
    for before, after in ((SPEC_BEFORE, without_where), (without_where, SPEC_BEFORE)):
        activation = {"self": celpy.json_to_cel(after), "oldSelf": celpy.json_to_cel(before)}
        assert not all(bool(env.program(env.compile(r["rule"])).evaluate(activation)) for r in rules)


def test_a_kind_of_change_is_never_defaulted_by_the_server():
    """`default: {}` on delete (or copy) would turn every Backfill into a delete on the API server."""
    spec = openapi_schema()["properties"]["spec"]
    for name in KIND_FIELDS:
        assert "default" not in spec["properties"][name], name
    assert spec["oneOf"] == [{"required": [name]} for name in KIND_FIELDS]


@pytest.mark.parametrize(("spec", "allowed"), [
    ({"walk": "ctid", "where": "NOT done"}, True),
    ({"walk": "ctid"}, False),
    ({"walk": "key"}, True),
    ({}, True),
])
def test_cel_refuses_a_ctid_walk_without_where(spec, allowed):
    """``walk: ctid`` needs ``where`` (docs/ctid.md): refused at admission too, where CEL runs."""
    import celpy

    env = celpy.Environment()
    (rule,) = [r for r in openapi_schema()["properties"]["spec"]["x-kubernetes-validations"] if "oldSelf" not in r["rule"]]
    after = {"table": "logs", "set": {"done": "true"}, **spec}
    activation = {"self": celpy.json_to_cel(after), "oldSelf": celpy.json_to_cel(after)}
    assert bool(env.program(env.compile(rule["rule"])).evaluate(activation)) is allowed
    assert "walk: ctid needs spec.where" in rule["message"]
