from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.CreateModel(
            name="Customer",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("email", models.CharField(max_length=254)),
                ("status", models.CharField(max_length=20, null=True)),
                ("last_login", models.DateTimeField()),
            ],
        ),
        migrations.CreateModel(
            name="CustomerAudit",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("customer_id", models.BigIntegerField(db_index=True)),
                ("status", models.CharField(max_length=20, null=True)),
                ("at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
    ]
