"""The seed's change as the SQL manifest, queued (local mode: run here) by migrate."""

from django.db import migrations

from backfill_django.operations import QueueBackfill


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("customers", "0001_initial")]
    operations = [QueueBackfill("backfill.yaml")]
