"""The seed's naive data migration, as written: every customer, save() per row, ONE transaction.

Kept for comparison ($SHOP_MIGRATIONS=naive, benchmarks/bench_django.py): every saved row stays
locked until the last one is done, and a crash rolls all of it back.
"""

from datetime import timedelta

from django.db import migrations
from django.utils import timezone


def deactivate_inactive(apps, schema_editor):
    Customer = apps.get_model("customers", "Customer")
    year_ago = timezone.now() - timedelta(days=365)
    for customer in Customer.objects.all():
        if customer.status is None and customer.last_login < year_ago:
            customer.status = "inactive"
            customer.save()


class Migration(migrations.Migration):
    dependencies = [("customers", "0001_initial")]
    operations = [migrations.RunPython(deactivate_inactive, migrations.RunPython.noop)]
