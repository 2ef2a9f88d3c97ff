"""The Django app: ``INSTALLED_APPS = [..., "backfill_django"]`` makes ``manage.py backfill`` available.

The app has no models: progress lives in the engine's own checkpoint table (``backfill`` schema
by default), written in each batch's transaction, not in Django's migrations.
"""

from __future__ import annotations

from django.apps import AppConfig


class BackfillDjangoConfig(AppConfig):
    name = "backfill_django"
    label = "backfill_django"
    verbose_name = "Backfill (online, batched data migrations)"
