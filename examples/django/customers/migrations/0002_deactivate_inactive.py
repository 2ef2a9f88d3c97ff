"""The seed's data migration as a Backfill: queued here, run in committed batches outside this
migration's transaction (local mode: by migrate itself; cluster mode: by the operator)."""

from django.db import migrations

from backfill_django.operations import QueueBackfill


class Migration(migrations.Migration):
    atomic = False  # required: the backfill commits batch by batch, on its own sessions
    dependencies = [("customers", "0001_initial")]
    operations = [QueueBackfill("backfill-orm.yaml")]
