"""SIGKILL a real ``backfill run`` at random moments mid-run, then run it to the end (crash tests)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BACKFILL = str(Path(sys.executable).parent / "backfill")
ALREADY_RUNNING = 3
RUN: Sequence[str] = (BACKFILL, "run")
"""The command before the manifest (``manage.py backfill run`` for the Django example)."""


def kill_mid_run(manifest: Path, env: dict[str, str], kills: int, rng: random.Random, *, max_delay: float,
                 deadline: float = 90, command: Sequence[str] = RUN, cwd: Path | None = None) -> int:
    """Start ``backfill run`` and SIGKILL it 0..``max_delay`` s after its first committed batch,
    ``kills`` times (fewer if a run finishes first); returns the kills that landed mid-run."""
    landed = 0
    started = time.monotonic()
    while landed < kills:
        assert time.monotonic() - started < deadline, f"only {landed} kills landed mid-run"
        proc = subprocess.Popen(
            [*command, str(manifest), "--json-progress"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, cwd=cwd,
        )
        assert proc.stdout is not None
        # Wait until batches are being committed, then kill at a random moment (often mid-transaction).
        running = False
        for line in proc.stdout:
            if '"BatchCommitted"' in line:
                running = True
                break
        if not running:  # finished already, or lost the lock race against the previous (dying) run
            proc.wait(timeout=30)
            assert proc.returncode in (0, ALREADY_RUNNING), proc.returncode
            if proc.returncode == 0:
                break
            time.sleep(0.1)
            continue
        time.sleep(rng.uniform(0.0, max_delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        landed += 1
    return landed


def run_to_the_end(manifest: Path, env: dict[str, str], *, command: Sequence[str] = RUN,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``backfill run`` until it is not refused as already running (a killed run's session may linger)."""
    for _ in range(50):
        final = subprocess.run([*command, str(manifest)], capture_output=True, text=True, env=env, timeout=180, cwd=cwd)
        if final.returncode != ALREADY_RUNNING:
            break
        time.sleep(0.2)
    return final
