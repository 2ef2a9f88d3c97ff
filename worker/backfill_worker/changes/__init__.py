"""What a batch changes: the change kinds (update, copy, delete, Python handler) and the runtime of
user handlers (loading, the guard, the batch they see). Handler runtimes other than plain Python
(Django) are plugins found through the ``backfill_operator.handler_runtimes`` entry points.

Layer 5: imports ``backfill_api`` and the layers below (checkpoints, sql, observe, throttles).
"""
