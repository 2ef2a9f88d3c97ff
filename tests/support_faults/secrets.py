"""Asserting that a secret is absent from everything a run produced."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CANARY_PASSWORD = "canary-Pw-7f3a9Q"
"""Must equal tests/conftest.py's CANARY_PASSWORD (asserted by test_secrets_everywhere)."""


def assert_absent(secrets: Iterable[str], captured: Mapping[str, str]) -> None:
    """Fail naming the channel (stdout, log, status...) that contains any of ``secrets``."""
    secrets = [s for s in secrets if s]
    assert secrets, "nothing to look for"
    leaks = [name for name, text in captured.items() for secret in secrets if secret in text]
    assert not leaks, f"secret found in: {sorted(set(leaks))}"
