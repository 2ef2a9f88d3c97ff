"""QueueBackfill naming a manifest that is not there: refused before anything is written."""

from django.db import migrations

from backfill_django.operations import QueueBackfill


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("customers", "0001_initial")]
    operations = [QueueBackfill("deploy/no-such-backfill.yaml")]
