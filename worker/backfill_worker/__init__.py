"""The backfill engine, in layers; each subpackage imports only the layers listed before it
(tests/test_import_graph.py checks every import, also lazy ones):

1. ``checkpoints`` : the per-shard checkpoint record, its stores and guard;
2. ``sql`` : statements, connections, session settings, locks, retries, DSN redaction;
3. ``observe`` : events and their listeners (logs, metrics, progress);
4. ``throttles`` : pacing, batch sizing, health, application impact, schedule;
5. ``changes`` : what a batch changes, user handlers and handler runtimes;
6. ``plan`` : validation against the database and ``backfill plan``;
7. ``run`` : the engine (``run.engine.run_backfill``);
8. ``kube`` : the Kubernetes adapter (the in-cluster worker).

The package itself imports nothing: import the module that holds what you need.
"""
