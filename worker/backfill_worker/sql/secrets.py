"""Keeping DSNs and passwords out of every message the project emits."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from psycopg.conninfo import conninfo_to_dict

_URI_PASSWORD = re.compile(r"(?P<scheme>postgres(?:ql)?://[^:/@\s]*:)(?P<password>[^@\s]*)@")
_KV_PASSWORD = re.compile(r"(?P<key>password\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
MASK = "***"


def secrets_of(dsn: str) -> list[str]:
    """The values inside ``dsn`` that must never be shown (the password, and the DSN itself)."""
    found = [dsn]
    try:
        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001 - an unparsable DSN is still a secret as a whole
        password = None
        # libpq's parse errors quote the word they choke on ('missing "=" after "<word>"'): with
        # an unquoted password containing a space, that word is a piece of the password.
        found += [word for word in dsn.split() if "=" not in word and "://" not in word]
    if password:
        found.append(str(password))
    return [value for value in found if value]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask known secret values and anything shaped like a password inside a DSN."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret and len(secret) >= 3:
            text = text.replace(secret, MASK)
    text = _URI_PASSWORD.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m.group('key')}{MASK}", text)


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` for messages: enough to tell targets apart, nothing secret."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - redaction must never fail
        return "(unparsable DSN)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    user = params.get("user") or "(default user)"
    dbname = params.get("dbname") or user
    return f"{user}@{host}:{port}/{dbname}"


class RedactingFilter(logging.Filter):
    """Scrubs registered secrets from every record that passes through a handler."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, *secrets: str) -> None:
        self._secrets.update(s for s in secrets if s)

    def redact(self, text: str) -> str:
        """``text`` without any registered secret (for messages that do not pass through logging)."""
        return redact(text, self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


REDACTOR = RedactingFilter()
"""Process-wide filter; ``register_dsn`` adds a DSN's secrets to it."""


def register_dsn(dsn: str) -> None:
    REDACTOR.add(*secrets_of(dsn))
