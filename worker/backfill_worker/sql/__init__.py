"""The database: the SQL the engine runs (statements, key types, catalog introspection, ctid
blocks, shard splitting, key prefetch), the connection and its session settings, DSN redaction,
the advisory lock and which database errors are worth retrying.

Layer 2: imports ``backfill_api`` and ``backfill_worker.checkpoints`` only.
"""
