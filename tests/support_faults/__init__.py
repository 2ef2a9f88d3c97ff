"""Fault-injection helpers for the fault, bad-input and secrets tests (not tests themselves).

Test modules put ``tests/`` on ``sys.path`` and import ``support_faults.*`` (the suite runs with
``--import-mode=importlib``, so helpers beside the tests are not importable by default).
"""
