"""The Backfill operator (kopf). Pure decisions apart from I/O; the contract (model, status,
conditions, CRD) lives in ``backfill_api``:

* ``jobs``       — worker Job rendering and reading Job state
* ``reconcile``  — the level-triggered plan: status, Jobs to create/delete, Events
* ``rbac``       — least-privilege rules as data; renders ``deploy/``
* ``handlers``   — the thin I/O layer wired into kopf (watch + resync)
* ``metrics``    — operator Prometheus metrics
* ``main``       — ``run_operator``: kopf standalone, liveness, metrics
"""
