"""The ``backfill`` command: the only package that imports both the worker and the operator.

* ``app``      — the typer app: ``run``, ``plan``, ``status``, ``reset``, ``demo`` (local)
* ``cluster``  — ``crd``, ``worker``, ``operator`` (in-cluster; imported lazily per command)
* ``progress`` — the terminal progress bar and JSON-lines progress of ``backfill run``
"""
