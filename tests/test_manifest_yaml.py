"""The manifest dialect (``manifest_yaml.py``): strict like the API server, documented in the README."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backfill_api.errors import ManifestError
from backfill_api.manifest import load_backfill
from backfill_api.manifest_yaml import load_documents

HEAD = "apiVersion: backfill.dev/v1alpha1\nkind: Backfill\nmetadata: {name: m, namespace: t}\n"


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return load_backfill(path)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (HEAD + "spec: {table: t, set: {v: '1'}, where: a, where: b}\n", "spec.where"),
        (HEAD + "spec:\n  table: t\n  set: {v: '1'}\n  batch:\n    size: 10\n    size: 20\n", "spec.batch.size"),
        (HEAD + "metadata: {name: other}\nspec: {table: t, set: {v: '1'}}\n", "metadata"),
        (HEAD + "spec:\n  table: t\n  set: {v: '1'}\n  worker:\n    tolerations:\n    - {key: a, key: b}\n",
         "spec.worker.tolerations[0].key"),
    ],
)
def test_duplicate_keys_are_refused_with_their_path(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load(tmp_path, text)
    assert f"{path}: duplicate key" in str(caught.value)


def test_merge_keys_and_aliases_work_and_do_not_count_as_duplicates(tmp_path: Path) -> None:
    text = HEAD + "x-defaults: &d {size: 10, minSize: 5}\nspec:\n  table: t\n  set: {v: '1'}\n  batch:\n    <<: *d\n    maxSize: 50\n"
    docs = load_documents(text)
    assert docs[0]["spec"]["batch"] == {"size": 10, "minSize": 5, "maxSize": 50}


def test_dates_stay_strings_as_through_json() -> None:
    assert load_documents("a: 2024-01-01\nb: 2024-01-01 10:00:00\n") == [{"a": "2024-01-01", "b": "2024-01-01 10:00:00"}]


def test_an_alias_bomb_is_walked_once() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    started = time.process_time()
    docs = load_documents("\n".join(lines) + "\n")
    assert len(docs[0]["a11"]) == 6 and time.process_time() - started < 30  # 6**11 paths, one walk per node


def test_operations_manual_documents_the_dialect() -> None:
    readme = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "## Manifest YAML dialect" in readme
    section = readme.split("## Manifest YAML dialect", 1)[1].split("\n## ", 1)[0]
    for fact in ("YAML 1.1", "duplicate key", "65536", "3 MiB", "strings"):
        assert fact in section, fact
