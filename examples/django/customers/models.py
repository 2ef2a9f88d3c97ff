"""The seed's Customer model, and the audit trail its post_save receiver writes."""

from django.db import models


class Customer(models.Model):
    email = models.CharField(max_length=254)
    status = models.CharField(max_length=20, null=True)
    last_login = models.DateTimeField()


class CustomerAudit(models.Model):
    """One row per save() of a Customer: the proof that each customer was changed exactly once."""

    customer_id = models.BigIntegerField(db_index=True)
    status = models.CharField(max_length=20, null=True)
    at = models.DateTimeField(auto_now_add=True)
