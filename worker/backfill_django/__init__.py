"""Django integration (``pip install 'backfill-operator[django]'``; Django >= 4.2 with psycopg 3).

Put ``"backfill_django"`` in ``INSTALLED_APPS`` for the ``manage.py backfill`` command. The pieces:

* ``runtime``    — handlers on Django's own connection: ``DjangoBatch`` (a QuerySet narrowed to
  the batch), so ``save()``, ``bulk_update()`` and signal receivers commit with the checkpoint
* ``queryset``   — ``manifest_from_queryset``: a QuerySet + ``update(**kwargs)`` compiled by
  Django's SQL compiler into the manifest's ``where``/``set`` (pure SQL speed, no SQL written)
* ``operations`` — migration operations: ``QueueBackfill`` (create the Backfill in the cluster,
  or run it locally, in batches, outside the migration's transaction) and
  ``EnsureBackfillSucceeded`` (a later migration fails until the Backfill has Succeeded)
* ``management/commands/backfill.py`` — ``manage.py backfill run|plan|status|manifest``, the
  ``backfill`` CLI's own code with the DSN taken from ``settings.DATABASES``

Names are imported on first use (PEP 562), so the worker importing ``backfill_django.runtime``
for a ``spec.handler.django`` manifest loads neither the migration machinery nor the CLI.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .operations import EnsureBackfillSucceeded, QueueBackfill
    from .queryset import manifest_from_queryset
    from .runtime import DjangoBatch

__all__ = ["DjangoBatch", "EnsureBackfillSucceeded", "QueueBackfill", "manifest_from_queryset"]

_HOMES = {
    "DjangoBatch": ".runtime",
    "EnsureBackfillSucceeded": ".operations",
    "QueueBackfill": ".operations",
    "manifest_from_queryset": ".queryset",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(home, __name__), name)
