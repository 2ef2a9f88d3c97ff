"""What a run tells the world: the events the engine emits (and the run control it reads), and
their listeners: structured logs, the worker's Prometheus metrics, the run's progress summary.

Layer 3: imports ``backfill_api``, ``backfill_worker.checkpoints`` and ``backfill_worker.sql``.
"""
