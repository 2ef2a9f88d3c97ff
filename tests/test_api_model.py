from datetime import timedelta

import pytest

from backfill_api.durations import format_duration, parse_duration
from backfill_api.errors import ManifestError
from backfill_api.identifiers import parse_qualified_name
from backfill_api.manifest import parse_backfill
from backfill_api.model import Backfill

MINIMAL = {
    "apiVersion": "backfill.dev/v1alpha1",
    "kind": "Backfill",
    "metadata": {"name": "customers-inactive", "namespace": "shop"},
    "spec": {"table": "public.customers", "set": {"status": "'inactive'"}},
}


def with_spec(**spec):
    return {**MINIMAL, "spec": {**MINIMAL["spec"], **spec}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0.0), ("500ms", 0.5), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_durations_parse_kubernetes_style(text, expected):
    assert parse_duration(text).total_seconds() == expected


@pytest.mark.parametrize("text", ["5", "1d", "ms", "-1s", "1 s", ""])
def test_bad_durations_name_the_fix(text):
    with pytest.raises(ValueError, match="unit|duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0, 0.25, 2, 90, 3600, 3723])
def test_durations_round_trip(seconds):
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


def test_defaults_fill_in():
    backfill = parse_backfill(MINIMAL)
    assert backfill.identity == "shop/customers-inactive"
    assert backfill.spec.batch.size == 1000
    assert backfill.spec.limits.lock_timeout == timedelta(seconds=1)
    assert backfill.spec.key is None
    assert backfill.spec.checkpoint.schema_name == "backfill"


def test_key_accepts_a_single_column_or_a_list():
    assert parse_backfill(with_spec(key="id")).spec.key == ["id"]
    assert parse_backfill(with_spec(key=["tenant", "id"])).spec.key == ["tenant", "id"]


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"batchSize": 10}, "spec.batchSize: unknown field"),
        ({"batch": {"size": 0}}, "spec.batch.size"),
        ({"batch": {"targetDuration": "5"}}, "spec.batch.targetDuration"),
        ({"batch": {"minSize": 10, "maxSize": 5, "size": 7}}, "spec.batch: minSize"),
        ({"set": {}}, "spec.set"),
        ({"set": {"status": "  "}}, "spec.set: expression for column 'status' is empty"),
        ({"where": " "}, "spec.where"),
        ({"key": []}, "spec.key"),
        ({"table": "a.b.c"}, "spec.table"),
        ({"limits": {"lockTimeout": "soon"}}, "spec.limits.lockTimeout"),
        ({"parallelism": 0}, "spec.parallelism"),
    ],
)
def test_bad_specs_name_the_field(spec, path):
    with pytest.raises(ManifestError) as caught:
        parse_backfill(with_spec(**spec))
    assert any(problem.startswith(path) for problem in caught.value.problems), caught.value.problems


def test_missing_table_is_reported_as_required():
    document = {**MINIMAL, "spec": {"set": {"a": "1"}}}
    with pytest.raises(ManifestError) as caught:
        parse_backfill(document)
    assert "spec.table: required field is missing" in caught.value.problems


def test_fingerprint_ignores_tunables_but_not_the_change():
    base = parse_backfill(MINIMAL).spec.fingerprint()
    assert parse_backfill(with_spec(batch={"size": 500})).spec.fingerprint() == base
    assert parse_backfill(with_spec(where="status IS NULL")).spec.fingerprint() != base


def test_dump_uses_the_wire_names():
    dumped = parse_backfill(MINIMAL).model_dump(by_alias=True, mode="json", exclude_none=True)
    assert dumped["spec"]["batch"]["targetDuration"] == "200ms"
    assert dumped["spec"]["checkpoint"]["schema"] == "backfill"
    assert Backfill.model_validate(dumped) == parse_backfill(MINIMAL)


@pytest.mark.parametrize(
    ("text", "schema", "name"),
    [
        ("customers", None, "customers"),
        ("Public.Customers", "public", "customers"),
        ('"odd.schema"."we;""ird"', "odd.schema", 'we;"ird'),
        ('"Ünï"', None, "Ünï"),
    ],
)
def test_table_names_parse_like_postgres(text, schema, name):
    parsed = parse_qualified_name(text)
    assert (parsed.schema, parsed.name) == (schema, name)


@pytest.mark.parametrize("text", ["a.b.c", '"x', "a..b", '"a"b'])
def test_bad_table_names_are_rejected(text):
    with pytest.raises(ValueError):
        parse_qualified_name(text)
