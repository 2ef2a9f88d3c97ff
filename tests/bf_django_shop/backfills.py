"""Handlers for the tests: the ORM with save() and signals, and some that misbehave."""

from django.db import connection, transaction

SLEPT: list[bool] = []


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


def slow_once(batch):
    """The first attempt outlives statementTimeout inside the ORM (Django wraps the error): retried."""
    if not SLEPT:
        SLEPT.append(True)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.5)")
    return deactivate(batch)


TERMINATED: list[bool] = []


def terminate_once(batch):
    """The first attempt loses its session (terminated by the server): the engine reconnects through Django."""
    if not TERMINATED:
        TERMINATED.append(True)
        deactivate(batch)  # written, then lost with the session: must not count
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    return deactivate(batch)
