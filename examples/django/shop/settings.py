"""Settings of the example shop: one PostgreSQL database, the customers app, backfill_django.

``$SHOP_DSN`` (libpq connection string or URI) names the database; ``$SHOP_MIGRATIONS=naive``
swaps in the seed's naive ``RunPython`` migration (``customers/migrations_naive``) for comparison
(the test suite names other migration packages there the same way).
``$BACKFILL_MODE`` (``local`` or ``cluster``) says where ``QueueBackfill`` runs (default local).
"""

import os
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "example-only-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "customers", "backfill_django"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_params = conninfo_to_dict(os.environ.get("SHOP_DSN", "dbname=shop"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3
        "NAME": _params.pop("dbname", "shop"),
        "USER": _params.pop("user", ""),
        "PASSWORD": _params.pop("password", ""),
        "HOST": _params.pop("host", ""),
        "PORT": _params.pop("port", ""),
        "OPTIONS": _params,
    }
}
if _migrations := os.environ.get("SHOP_MIGRATIONS"):
    MIGRATION_MODULES = {"customers": "customers.migrations_naive" if _migrations == "naive" else _migrations}

# Where QueueBackfill runs: "local" (migrate runs it, in batches) or "cluster" (creates the
# Backfill object for the operator); $BACKFILL_MODE overrides.
BACKFILL = {"MODE": "local", "KUBECONFIG": os.environ.get("KUBECONFIG")}
