"""Graceful stop on SIGTERM/SIGINT, shared by ``backfill run`` and the in-cluster worker."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol


class Stoppable(Protocol):
    def request_stop(self, reason: str) -> None: ...


@contextmanager
def stop_on_signals(control: Stoppable, announce: Callable[[str], None] | None = None) -> Iterator[None]:
    """The first SIGTERM/SIGINT asks for a stop after the current batch (committed, state
    ``paused``, exit 0); a second one aborts at once (the open batch rolls back).

    Pod deletion, node drains and Backfill deletion all arrive as SIGTERM. Only the main thread
    may install handlers, so elsewhere (a worker run inside a test's thread) this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        control.request_stop("signal")
        if announce is not None:
            announce(f"{signal.Signals(signum).name}: stopping after the current batch (again to abort)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
