"""The Kubernetes adapter: the in-cluster worker (``backfill worker``) that reads its Backfill
object, runs the engine on its shard and mirrors progress into the status.

Layer 8 (the top): imports ``backfill_api`` and any layer of the engine; no engine layer imports it.
"""
