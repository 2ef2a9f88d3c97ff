"""The ``Backfill`` contract shared by the worker, the operator and the CLI.

Layering: ``backfill_api`` imports neither ``backfill_worker`` nor ``backfill_operator``; both of
those import it and never each other (``tests/test_import_graph.py``). Only the ``backfill`` CLI
(``backfill_cli``) knows both sides.

* ``model``       — the ``Backfill`` resource and its spec (pydantic): the single source of truth
* ``status``      — the typed status (phase, shard states, progress, conditions, stall reasons)
* ``conditions``  — kstatus conditions (Ready, Reconciling, Stalled)
* ``specdiff``    — immutable-field rules and the ``backfill.dev/applied-spec`` annotation
* ``crd``         — the CRD (spec and status schema, printer columns) generated from the models
* ``reference``   — ``docs/reference.md`` generated from the models
* ``manifest``    — parsing a manifest, with field paths in error messages
* ``errors``      — the errors both sides report (exit codes and status reasons)
* ``durations``, ``identifiers`` — ``1m30s`` durations; quoted table names
* ``kubeapi``     — the small Kubernetes client both sides use for Backfills, Jobs and Secrets
* ``serving``     — a ``/metrics`` endpoint for a Prometheus registry
"""
