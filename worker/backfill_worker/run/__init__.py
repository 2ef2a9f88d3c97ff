"""The engine: a run of a backfill over its shards (``run_backfill``), the batch transaction, the
run's checkpoint bookkeeping, graceful stop on signals.

Layer 7: imports ``backfill_api`` and every layer below (checkpoints ... plan); nothing here knows
Kubernetes.
"""
