"""Checkpoints: the per-shard record (state, last key, counters), where it is stored, and the guard
that refuses a checkpoint written for another table or key.

Layer 1 (the lowest): imports only ``backfill_api``. The run's checkpoint bookkeeping during a
backfill (one interface, transactional or at-least-once) is ``backfill_worker.run.checkpointing``.
"""
