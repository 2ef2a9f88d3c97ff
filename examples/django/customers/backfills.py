"""The seed's data migration as Backfill code: the ORM handler, and the QuerySet for the SQL version."""

from datetime import timedelta

from django.db.models import Value
from django.db.models.functions import Now

from backfill_django.runtime import DjangoBatch

from .models import Customer


def deactivate(batch: DjangoBatch) -> int:
    """The seed's loop body, unchanged: save() per row, so signals run (the audit row) and commit
    with the batch's checkpoint. ``batch.queryset`` is this batch's key range, rows still matching
    the manifest's ``where``, locked, in key order."""
    changed = 0
    for customer in batch.queryset:
        customer.status = "inactive"
        customer.save(update_fields=["status"])
        changed += 1
    return changed


def stale_customers(model=Customer):
    """The declarative version: ``manage.py backfill manifest customers.backfills:stale_customers``
    compiles this QuerySet and update to the manifest's where/set (no Python per row, no signals).
    ``Now()`` is SQL (evaluated per batch), so the compiled change is the same whenever it is compiled."""
    year_ago = Now() - timedelta(days=365)
    return model.objects.filter(status__isnull=True, last_login__lt=year_ago), {"status": Value("inactive")}
