"""The application-thread harness must not hide a failing or stuck application thread."""

from __future__ import annotations

import threading

import pytest
from support_faults.app_threads import AppThreads


def test_an_error_in_an_application_thread_fails_stop():
    threads = AppThreads()

    def broken() -> None:
        raise RuntimeError("application crashed")

    threads.spawn(broken)
    with pytest.raises(RuntimeError, match="application crashed"), threads:
        pass


def test_a_stuck_application_thread_fails_stop():
    release = threading.Event()
    threads = AppThreads()
    threads.JOIN_SECONDS = 0.2
    threads.spawn(release.wait)  # ignores the stop event: stuck
    try:
        with pytest.raises(AssertionError, match="stuck"), threads:
            pass
    finally:
        release.set()


def test_threads_stop_on_the_shared_event():
    threads = AppThreads()
    rounds: list[int] = []

    def loop() -> None:
        while not threads._stop.wait(0.01):
            rounds.append(1)

    threads.spawn(loop)
    threads.spawn(loop)
    with threads:
        while len(rounds) < 4:
            threading.Event().wait(0.01)
    assert len(rounds) >= 4
