"""Polling helpers for tests that wait on an operator, a worker or a Job controller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

INTERVAL = 0.2


def _timed_out(what: str, last: Any) -> AssertionError:
    # An exception is named by type only: its text might quote a DSN the suite must never print.
    shown = type(last).__name__ if isinstance(last, Exception) else repr(last)
    return AssertionError(f"timed out waiting for {what}; last: {shown}")


def eventually(probe: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Call ``probe`` until it returns something truthy; errors count as "not there yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except Exception as error:  # not there yet
            last = error
        if last and not isinstance(last, Exception):
            return last
        time.sleep(INTERVAL)
    raise _timed_out(what, last)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client call off the event loop (kmock serves on that loop)."""
    return await asyncio.to_thread(fn, *args)


async def eventually_async(probe: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """:func:`eventually` for async tests: the blocking probe runs in a thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        try:
            last = await call(probe)
        except Exception as error:  # not there yet
            last = error
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(INTERVAL)
    raise _timed_out(what, last)


async def operator_has_looked(api: Any, path: str, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """Proof that the running operator reconciled the Backfill at ``path`` after this call.

    For absence checks ("still one Job"): instead of sleeping and hoping some passes ran, make a
    harmless live edit (``spec.batch.pause``, a tunable) that bumps ``metadata.generation`` and
    wait until the operator reports it as ``status.observedGeneration``. The pass that wrote it
    also decided on the Jobs, so what the test checks next reflects a decision made after now.
    """
    current = await call(api.get, path)
    pause = "1ms" if ((current.get("spec") or {}).get("batch") or {}).get("pause") != "1ms" else "2ms"
    edited = await call(api.merge_patch, path, {"spec": {"batch": {"pause": pause}}})
    generation = edited["metadata"]["generation"]
    return await eventually_async(
        lambda: (b := api.get(path)).get("status", {}).get("observedGeneration") == generation and b,
        f"the operator to observe generation {generation} ({what})", timeout=timeout,
    )
