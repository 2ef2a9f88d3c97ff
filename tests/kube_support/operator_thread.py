"""Run the real operator (kopf) in a background thread, stoppable, for end-to-end tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

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
