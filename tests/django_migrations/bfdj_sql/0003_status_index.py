"""Needs the data: fails until customers-inactive-sql has Succeeded."""

from django.db import migrations, models

from backfill_django.operations import EnsureBackfillSucceeded


class Migration(migrations.Migration):
    dependencies = [("customers", "0002_deactivate")]
    operations = [
        EnsureBackfillSucceeded(manifest="backfill.yaml"),
        migrations.AddIndex("customer", models.Index(fields=["status"], name="customer_status_idx")),
    ]
