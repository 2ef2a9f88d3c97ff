"""Run the real operator (kopf) in a background thread, stoppable, for end-to-end tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from backfill_operator.main import OperatorConfig, run_operator


@contextmanager
def operator_running(config: OperatorConfig, *, startup_timeout: float = 30.0) -> Iterator[None]:
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_operator(config, stop_flag=stop, ready_flag=ready)
        except BaseException as error:  # surfaced to the test below
            errors.append(error)
            ready.set()

    thread = threading.Thread(target=target, name="backfill-operator", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout) or errors:
        stop.set()
        raise RuntimeError(f"operator did not start: {errors!r}")
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        if errors:
            raise errors[0]


@asynccontextmanager
async def operator_running_async(config: OperatorConfig, *, startup_timeout: float = 30.0) -> AsyncIterator[None]:
    """For async tests whose event loop serves the API (kmock): start and stop off the loop.

    Stopping kopf talks to the API server; joining its thread on the loop that serves that API
    would block both until the join times out.
    """
    context = operator_running(config, startup_timeout=startup_timeout)
    await asyncio.to_thread(context.__enter__)
    try:
        yield
    finally:
        await asyncio.to_thread(context.__exit__, None, None, None)
