"""Graceful stop: the first SIGTERM asks for a stop at the batch boundary, a second one aborts."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from backfill_worker.observe.events import StaticControl
from backfill_worker.run.signals import stop_on_signals

SCRIPT = """
import os, signal, sys
from backfill_worker.observe.events import StaticControl
from backfill_worker.run.signals import stop_on_signals
control = StaticControl()
with stop_on_signals(control, announce=lambda m: print(m, flush=True)):
    os.kill(os.getpid(), signal.SIGTERM)
    print("stop_reason", control.stop_reason(), flush=True)
    if sys.argv[1] == "twice":
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived the second signal", flush=True)
print("handlers restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)


def test_first_signal_requests_a_stop_and_handlers_are_restored():
    result = run("once")
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: stopping after the current batch" in result.stdout
    assert "stop_reason signal" in result.stdout
    assert "handlers restored: True" in result.stdout


def test_second_signal_aborts_at_once():
    result = run("twice")
    assert result.returncode == -signal.SIGTERM
    assert "stop_reason signal" in result.stdout
    assert "survived" not in result.stdout


def test_outside_the_main_thread_nothing_is_installed():
    control, seen = StaticControl(), []

    def body() -> None:
        with stop_on_signals(control):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before] and control.stop_reason() is None
