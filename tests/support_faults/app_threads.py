"""Background "application" threads for fault tests: started together, stopped by one event.

Stopping fails the test when a thread is stuck (a deadlock that never resolves) or when one of
them raised: an application thread that died quietly would make its figures look better.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class AppThreads:
    JOIN_SECONDS = 30.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def spawn(self, target: Callable[..., None], *args: Any, name: str | None = None) -> None:
        """Add a thread running ``target(*args)`` (started by :meth:`start`)."""

        def guarded() -> None:
            try:
                target(*args)
            except BaseException as error:  # surfaced by stop()
                self._errors.append(error)

        self._threads.append(threading.Thread(target=guarded, daemon=True, name=name))

    def start(self) -> AppThreads:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.JOIN_SECONDS)
            assert not thread.is_alive(), "an application thread is stuck"
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> AppThreads:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
