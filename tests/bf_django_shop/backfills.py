"""Handlers for the tests: the ORM with save() and signals, and some that misbehave."""

from django.db import transaction


def deactivate(batch):
    changed = 0
    for customer in batch.queryset:
        customer.status = "inactive"
        customer.save(update_fields=["status"])
        changed += 1
    return changed


def deactivate_uncounted(batch):
    for customer in batch.objects():
        customer.status = "inactive"
        customer.save(update_fields=["status"])


def explode(batch):
    deactivate(batch)
    raise RuntimeError(f"bad data after customer {batch.lower}")


def commits(batch):
    deactivate(batch)
    transaction.commit()
