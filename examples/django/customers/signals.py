"""A post_save receiver: runs inside whatever transaction save() runs in (the batch's, in a Backfill)."""

from django.db.models.signals import post_save
from django.dispatch import receiver

from .models import Customer, CustomerAudit


@receiver(post_save, sender=Customer)
def audit_status(sender: type[Customer], instance: Customer, created: bool, **kwargs: object) -> None:
    if not created:
        CustomerAudit.objects.create(customer_id=instance.pk, status=instance.status)
