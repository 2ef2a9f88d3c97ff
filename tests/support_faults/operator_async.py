"""The real operator in a thread, started and stopped without blocking the test's event loop.

kmock serves HTTP on the test's own event loop. Joining the operator thread synchronously
blocks that loop, so kopf cannot close its watch connections and the join only returns at its
timeout (30 s per stop, measured), with the old operator possibly still alive. Waiting in a
worker thread keeps kmock responsive: the operator stops in well under a second.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from backfill_operator.main import OperatorConfig, run_operator


@asynccontextmanager
async def operator_running(config: OperatorConfig, *, timeout: float = 30.0) -> AsyncIterator[threading.Thread]:
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_operator(config, stop_flag=stop, ready_flag=ready)
        except BaseException as error:  # surfaced below
            errors.append(error)
            ready.set()

    thread = threading.Thread(target=target, name="backfill-operator-under-test", daemon=True)
    thread.start()
    if not await asyncio.to_thread(ready.wait, timeout) or errors:
        stop.set()
        raise RuntimeError(f"operator did not start: {errors!r}")
    try:
        yield thread
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            raise AssertionError(f"the operator did not stop within {timeout} s")
        if errors:
            raise errors[0]
