"""Fault-injection helpers for the fault, bad-input and secrets tests (not tests themselves).

``tests/`` is on ``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so test
modules import ``support_faults.*`` and ``kube_support.*`` directly.
"""
