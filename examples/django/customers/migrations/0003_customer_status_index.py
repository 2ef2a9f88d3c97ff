"""Needs the backfilled data: migrate stops here, with the Backfill's phase and progress, until it
has Succeeded."""

from django.db import migrations, models

from backfill_django.operations import EnsureBackfillSucceeded


class Migration(migrations.Migration):
    dependencies = [("customers", "0002_deactivate_inactive")]
    operations = [
        EnsureBackfillSucceeded(manifest="backfill-orm.yaml"),
        migrations.AddIndex("customer", models.Index(fields=["status"], name="customer_status_idx")),
    ]
