"""A schema change and QueueBackfill in one migration left atomic (the default): refused with the fix."""

from django.db import migrations, models

from backfill_django.operations import QueueBackfill


class Migration(migrations.Migration):
    dependencies = [("customers", "0001_initial")]
    operations = [
        migrations.AddField("customer", "note", models.TextField(null=True)),
        QueueBackfill("backfill.yaml"),
    ]
