"""QueueBackfill from a QuerySet of the migration's historical model, compiled to where/set by Django."""

from django.db import migrations

from backfill_django.operations import QueueBackfill


def stale_customers(apps):
    from customers.backfills import stale_customers as of_model

    return of_model(apps.get_model("customers", "Customer"))


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("customers", "0001_initial")]
    operations = [QueueBackfill(queryset=stale_customers, name="customers-inactive-qs", namespace="shop")]
