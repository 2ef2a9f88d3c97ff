"""Parsing of user-written table names into parts that ``psycopg.sql.Identifier`` can quote."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql


@dataclass(frozen=True)
class QualifiedName:
    schema: str | None
    name: str

    def identifier(self) -> sql.Identifier:
        parts = (self.schema, self.name) if self.schema else (self.name,)
        return sql.Identifier(*parts)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


def _split_parts(text: str) -> list[tuple[str, bool]]:
    """Split on dots outside double quotes, honouring SQL's ``""`` escape inside quotes.

    Returns ``(part, was_quoted)`` pairs.
    """
    parts: list[tuple[str, bool]] = []
    current: list[str] = []
    quoted_part = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            if current and not quoted_part:
                raise ValueError(f"unexpected '\"' inside {text!r}: quote the whole part, e.g. '\"my.table\"'")
            end = i + 1
            name: list[str] = []
            while True:
                if end >= len(text):
                    raise ValueError(f"unterminated double quote in {text!r}")
                if text[end] == '"':
                    if end + 1 < len(text) and text[end + 1] == '"':
                        name.append('"')
                        end += 2
                        continue
                    break
                name.append(text[end])
                end += 1
            current = name
            quoted_part = True
            i = end + 1
            if i < len(text) and text[i] != ".":
                raise ValueError(f"expected '.' after the quoted part in {text!r}")
            continue
        if char == ".":
            parts.append(("".join(current), quoted_part))
            current, quoted_part = [], False
        else:
            if quoted_part:
                raise ValueError(f"expected '.' after the quoted part in {text!r}")
            current.append(char)
        i += 1
    parts.append(("".join(current), quoted_part))
    return parts


_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_unquoted(name: str) -> str:
    """PostgreSQL's ``downcase_identifier`` in a multi-byte encoding: only ASCII ``A-Z`` become
    lower case (``ÄB`` -> ``Äb``), unlike ``str.lower()`` (``äb``), which names another table."""
    return name.translate(_ASCII_UPPER)


def parse_qualified_name(text: str) -> QualifiedName:
    """``customers`` / ``public.customers`` / ``"odd.schema"."we;ird"``.

    Unquoted parts are folded as PostgreSQL folds them (:func:`fold_unquoted`); quoted parts are kept verbatim.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("table name is empty")
    parts = _split_parts(raw)
    if len(parts) > 2:
        raise ValueError(f"table {text!r} has {len(parts)} parts: use 'table' or 'schema.table' (quote names containing dots)")
    if any(not part for part, _ in parts):
        raise ValueError(f"table {text!r} has an empty part")
    folded = [part if quoted else fold_unquoted(part) for part, quoted in parts]
    if len(folded) == 1:
        return QualifiedName(None, folded[0])
    return QualifiedName(folded[0], folded[1])
