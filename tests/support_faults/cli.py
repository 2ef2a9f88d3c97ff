"""Starting the real ``backfill`` CLI as a subprocess, as a user (or a pod) would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg


def backfill_executable() -> list[str]:
    """The installed console script next to this interpreter (falls back to ``python -m``)."""
    script = Path(sys.executable).with_name("backfill")
    if script.exists():
        return [str(script)]
    found = shutil.which("backfill")
    return [found] if found else [sys.executable, "-c", "from backfill_cli.app import app; app()"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_env(dsn: str | None) -> dict[str, str]:
    """The DSN travels in ``BACKFILL_DSN`` (as in a pod), so it never shows in ``ps``."""
    env = {k: v for k, v in os.environ.items() if k != "BACKFILL_DSN"}
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    if dsn is not None:
        env["BACKFILL_DSN"] = dsn
    return env


def start(args: list[str], dsn: str | None, log_dir: Path, label: str) -> tuple[subprocess.Popen, Path, Path]:
    """``backfill ARGS`` in the background; stdout/stderr go to files (read them after it ends)."""
    out_path, err_path = log_dir / f"{label}.out", log_dir / f"{label}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [*backfill_executable(), *args], stdout=out, stderr=err, env=run_env(dsn), stdin=subprocess.DEVNULL
        )
    return process, out_path, err_path


def run(args: list[str], dsn: str | None, *, timeout: float = 120) -> Finished:
    result = subprocess.run(
        [*backfill_executable(), *args], capture_output=True, text=True, env=run_env(dsn), timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Finished(result.returncode, result.stdout, result.stderr)


def wait_for_backends_gone(dsn: str, application_prefix: str, timeout: float = 30) -> float:
    """Wait until no server session of a (killed) runner is left; returns the seconds waited.

    A SIGKILLed client's backend lingers until it notices the closed socket (at the end of its
    current statement) and only then releases the runner's advisory lock.
    """
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                [application_prefix.replace("%", r"\%") + "%"],
            ).fetchone()
            if not row or row[0] == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"sessions of {application_prefix!r} still present after {timeout} s")
            time.sleep(0.01)
