from django.apps import AppConfig


class CustomersConfig(AppConfig):
    name = "customers"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (registers the post_save audit receiver)
