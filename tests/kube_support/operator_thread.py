"""The real operator (kopf) in a background thread, stoppable: the one harness for every test.

``operator_running`` is for tests whose API server runs elsewhere (the real kube-apiserver);
``operator_running_async`` for async tests whose own event loop serves the API (kmock). There,
joining the operator thread on the loop would block kmock, so kopf could not close its watch
connections and the join would only return at its timeout (30 s per stop, measured), with the
old operator possibly still alive. Both start and stop go through a worker thread instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from backfill_operator.main import OperatorConfig, run_operator


class OperatorThread:
    """``run_operator`` on a daemon thread; errors it raises are re-raised by :meth:`stop`."""

    def __init__(self, config: OperatorConfig) -> None:
        self._config = config
        self._stop, self._ready = threading.Event(), threading.Event()
        self._errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._target, name="backfill-operator-under-test", daemon=True)

    def _target(self) -> None:
        try:
            run_operator(self._config, stop_flag=self._stop, ready_flag=self._ready)
        except BaseException as error:  # surfaced to the test by start() or stop()
            self._errors.append(error)
            self._ready.set()

    def start(self, timeout: float) -> None:
        self.thread.start()
        if not self._ready.wait(timeout) or self._errors:
            self._stop.set()
            raise RuntimeError(f"operator did not start: {self._errors!r}")

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the operator did not stop within {timeout} s")
        if self._errors:
            raise self._errors[0]


@contextmanager
def operator_running(config: OperatorConfig, *, timeout: float = 30.0) -> Iterator[threading.Thread]:
    operator = OperatorThread(config)
    operator.start(timeout)
    try:
        yield operator.thread
    finally:
        operator.stop(timeout)


@asynccontextmanager
async def operator_running_async(config: OperatorConfig, *, timeout: float = 30.0) -> AsyncIterator[threading.Thread]:
    operator = OperatorThread(config)
    await asyncio.to_thread(operator.start, timeout)
    try:
        yield operator.thread
    finally:
        await asyncio.to_thread(operator.stop, timeout)
