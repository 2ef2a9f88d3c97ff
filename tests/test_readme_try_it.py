"""The README's "Try it on your own database" commands, run verbatim but for the DSN."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def try_it_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Try it on your own database"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README lost its 'Try it' commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_try_it_commands_plan_then_run_the_example(database: str) -> None:
    lines = try_it_block()
    assert lines[0].startswith("export BACKFILL_DSN="), lines
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute((ROOT / "examples/customers-inactive/schema.sql").read_text())
    # The user's DSN, here the test database's; `backfill` from the interpreter's environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "BACKFILL_DSN": database, "PATH": path}
    for command in lines[1:]:
        result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    with psycopg.connect(database) as conn:
        wrong = conn.execute((ROOT / "examples/customers-inactive/verify.sql").read_text()).fetchone()
        changed = conn.execute("SELECT count(*) FROM public.customers WHERE status = 'inactive'").fetchone()
    assert wrong == (0,) and changed[0] > 0
