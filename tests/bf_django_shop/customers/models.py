"""The seed's Customer, and an audit row per save (a post_save receiver: non-idempotent on purpose)."""

from django.db import models
from django.db.models.signals import post_save
from django.dispatch import receiver


class Customer(models.Model):
    email = models.TextField()
    status = models.TextField(null=True)
    last_login = models.DateTimeField()
    visits = models.IntegerField(default=0)

    class Meta:
        app_label = "customers"
        db_table = "customers_customer"


class Audit(models.Model):
    customer_id = models.IntegerField()
    status = models.TextField(null=True)

    class Meta:
        app_label = "customers"
        db_table = "customers_audit"


@receiver(post_save, sender=Customer)
def audit(sender: type, instance: Customer, **kwargs: object) -> None:
    Audit.objects.create(customer_id=instance.pk, status=instance.status)
