"""Where a Backfill comes from in Django code: a callable returning ``(queryset, update)`` or a Backfill.

Used by ``manage.py backfill manifest MODULE:CALLABLE`` and ``QueueBackfill(queryset=...)``; the
compiling itself is ``queryset.manifest_from_queryset`` (Django's compiler, psycopg literals).
A QuerySet that should stay the same change over time must not inline the clock: write
``last_login__lt=Now() - timedelta(days=365)`` (compiled to SQL evaluated per batch), not
``timezone.now() - ...`` (a literal timestamp: a new fingerprint, so a new change, at every call).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from backfill_api.errors import ValidationFailed
from backfill_api.model import Backfill

from .queryset import manifest_from_queryset


def from_result(result: Any, *, name: str, namespace: str, spec: Mapping[str, Any], origin: str) -> Backfill:
    """A Backfill from what a source returned: a Backfill, or ``(queryset, update)``."""
    if isinstance(result, Backfill):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping) and hasattr(result[0], "query"):
        queryset, update = result
        return manifest_from_queryset(queryset, update, name=name, namespace=namespace, **dict(spec))
    raise ValidationFailed(origin, f"returned {type(result).__name__}: return (queryset, {{field: value}}) or a Backfill")


def backfill_from_callable(path: str, *, name: str, namespace: str = "default", spec: Mapping[str, Any] | None = None) -> Backfill:
    """Import ``module:callable``, call it without arguments, compile what it returns."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValidationFailed("MODULE:CALLABLE", f"{path!r}: name a function as module:function, e.g. customers.backfills:stale_customers")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValidationFailed("MODULE:CALLABLE", f"cannot import {module_name!r}: no module named {error.name!r}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValidationFailed("MODULE:CALLABLE", f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValidationFailed("MODULE:CALLABLE", f"{path} is a {type(target).__name__}, not a function")
    return from_result(target(), name=name, namespace=namespace, spec=spec or {}, origin=path)
