"""The Backfill operator (kopf). Pure decisions apart from I/O:

* ``crd``        — the CRD generated from ``backfill_worker.api`` (``backfill crd``)
* ``jobs``       — worker Job rendering and reading Job state
* ``conditions`` — kstatus conditions (Ready, Reconciling, Stalled)
* ``status``     — progress aggregation, phase conditions, merge-patch wire form
* ``specdiff``   — immutable-field rules and the ``backfill.dev/applied-spec`` annotation
* ``reconcile``  — the level-triggered plan: status, Jobs to create/delete, Events
* ``rbac``       — least-privilege rules as data; renders ``deploy/``
* ``handlers``   — the thin I/O layer wired into kopf (watch + resync)
* ``metrics``    — operator Prometheus metrics
* ``main``       — ``run_operator``: kopf standalone, liveness, metrics
* ``cli_commands`` — ``backfill crd | worker | operator``
"""
