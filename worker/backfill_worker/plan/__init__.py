"""Before a run writes anything: validation of the spec against the live database (target, key,
fragments, permissions) and the plan (``backfill plan``: shards, estimates, what each step runs).

Layer 6: imports ``backfill_api`` and the layers below (checkpoints ... changes).
"""
