"""The seed's data migration as Backfill code: the ORM handler, and the QuerySet for the SQL version."""

from datetime import timedelta

from django.db.models import Value
from django.utils import timezone

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


def stale_customers():
    """The declarative version: ``manage.py backfill manifest customers.backfills:stale_customers``
    compiles this QuerySet and update to the manifest's where/set (no Python per row, no signals)."""
    year_ago = timezone.now() - timedelta(days=365)
    return Customer.objects.filter(status__isnull=True, last_login__lt=year_ago), {"status": Value("inactive")}
