"""Reading manifest YAML as strictly as the Kubernetes API server reads it.

Dialect: YAML 1.1 through PyYAML's safe loader (the family of go-yaml v2, which ``kubectl`` and
the API server use): plain scalars ``true``/``false``/``yes``/``no``/``on``/``off`` are booleans,
anchors, aliases and merge keys (``<<``) work, only the standard tags are accepted (no Python
objects). Three differences from a plain ``yaml.safe_load``, each matching what Kubernetes does:

- a key repeated in one mapping is refused, naming its path (``spec.where: duplicate key``);
  PyYAML would silently keep the last one, and the API server rejects such a request;
- dates and timestamps stay strings (Kubernetes converts YAML to JSON, which has no date type);
- a file larger than :data:`MAX_MANIFEST_BYTES` is refused before parsing.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_MANIFEST_BYTES = 3 * 1024 * 1024
"""The API server refuses requests above 3 MiB (its default max request body); so do we."""


class DuplicateKeyError(ValueError):
    def __init__(self, path: str, line: int) -> None:
        self.path = path
        super().__init__(f"{path}: duplicate key (line {line}): a key may appear only once in a mapping, as in Kubernetes")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without the implicit timestamp type (dates stay strings, as through JSON)."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _child_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_duplicates(node: yaml.Node, path: str, seen: set[int]) -> None:
    """Walk the composed node graph once (aliases are shared nodes: never walked twice)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    _check_duplicates(value_node, path, seen)
                    continue
                key = str(key_node.value)
                if key in keys:
                    raise DuplicateKeyError(_child_path(path, key), key_node.start_mark.line + 1)
                keys.add(key)
                _check_duplicates(value_node, _child_path(path, key), seen)
            else:
                _check_duplicates(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{index}]", seen)


def load_documents(text: str) -> list[Any]:
    """Every non-empty document of ``text``; raises yaml.YAMLError or DuplicateKeyError."""
    loader = _StrictLoader(text)
    documents: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_duplicates(node, "", set())
            document = loader.construct_document(node)
            if document is not None:
                documents.append(document)
    finally:
        loader.dispose()
    return documents
