"""A minimal Django project for the handler runtime's tests (run in subprocesses: one Django per process)."""
