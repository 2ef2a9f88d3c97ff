"""Loading ``Backfill`` manifests from YAML, with errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ManifestError
from .manifest_yaml import MAX_MANIFEST_BYTES, DuplicateKeyError, load_documents
from .model import Backfill


def field_path(location: tuple[int | str, ...]) -> str:
    """``('spec', 'batch', 'size')`` -> ``spec.batch.size``; list indexes as ``[i]``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(manifest)"


def describe_validation_error(error: ValidationError) -> list[str]:
    """One ``path: message`` line per problem, without echoing the offending input values."""
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        location = tuple(part for part in problem["loc"] if part not in ("function-after", "function-before"))
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field: remove it or check its spelling (see docs/reference.md)"
        elif problem["type"] == "missing":
            message = "required field is missing"
        elif problem["type"] == "string_too_long":
            message = (
                f"{message}: SQL fragments are bounded so a runaway manifest is refused before anything is compiled; "
                "put long logic into a database function and call it here"
            )
        message = message.removeprefix("Value error, ")
        lines.append(f"{field_path(location)}: {message}")
    return lines


def parse_backfill(document: Any, *, source: str = "manifest") -> Backfill:
    if not isinstance(document, dict):
        raise ManifestError(source, ["(manifest): expected a YAML mapping with apiVersion, kind, metadata and spec"])
    try:
        return Backfill.model_validate(document)
    except ValidationError as error:
        raise ManifestError(source, describe_validation_error(error)) from None


def load_backfill(path: str | Path) -> Backfill:
    """Read the single ``Backfill`` document in ``path``."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_MANIFEST_BYTES:
            problem = (
                f"(file): {size:,} bytes is larger than the {MAX_MANIFEST_BYTES:,} bytes the Kubernetes API accepts; "
                "move long SQL into a database function and call it from spec.set/spec.where"
            )
            raise ManifestError(source, [problem])
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(source, [f"(file): cannot read: {error.strerror}"]) from None
    try:
        documents = load_documents(text)
    except DuplicateKeyError as error:
        raise ManifestError(source, [str(error)]) from None
    except yaml.YAMLError as error:
        raise ManifestError(source, [f"(yaml): {error}"]) from None
    backfills = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == "Backfill"]
    if len(backfills) != 1:
        if len(documents) == 1:
            return parse_backfill(documents[0], source=source)
        raise ManifestError(source, [f"(file): expected exactly one Backfill document, found {len(backfills)}"])
    return parse_backfill(backfills[0], source=source)
