"""How fast to go: the pacer and its batch sizer, the database-health throttle (pure decisions and
their probe), the application-impact governor (pure controller, its signals, the glue) and the
schedule window.

Layer 4: imports ``backfill_api`` and the layers below (checkpoints, sql, observe).
"""
