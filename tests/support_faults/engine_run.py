"""Running the real engine in a background thread while a test injects faults around it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from backfill_api.manifest import parse_backfill
from backfill_worker.observe.events import BatchCommitted, Event, RetryScheduled, StaticControl
from backfill_worker.run.engine import RunReport, run_backfill


@dataclass
class EngineThread:
    """``run_backfill`` on its own thread; events are recorded as they happen."""

    document: dict
    dsn: str
    events: list[Event] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    """``time.monotonic()`` at which each event of ``events`` arrived."""
    report: RunReport | None = None
    error: BaseException | None = None
    control: StaticControl = field(default_factory=StaticControl)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-under-test", daemon=True)
        self._lock = threading.Lock()

    def _listen(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            self.stamps.append(time.monotonic())

    def _run(self) -> None:
        try:
            self.report = run_backfill(
                parse_backfill(self.document), self.dsn, listeners=[self._listen], control=self.control
            )
        except BaseException as error:  # re-raised by join()
            self.error = error

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def join(self, timeout: float) -> RunReport:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.control.request_stop("test timeout")
            self._thread.join(30)
            raise AssertionError(f"the engine did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def of_type(self, kind: type) -> list:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]

    def timed(self, kind: type) -> list[tuple[float, Event]]:
        with self._lock:
            return [(t, e) for t, e in zip(self.stamps, self.events, strict=False) if isinstance(e, kind)]

    def batches(self) -> list[BatchCommitted]:
        return self.of_type(BatchCommitted)

    def retries(self) -> list[RetryScheduled]:
        return self.of_type(RetryScheduled)

    def wait_for_batches(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.batches()) < count:
            if not self.alive:
                raise AssertionError(f"the engine stopped after {len(self.batches())} batches (wanted {count}): {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.batches())} batches after {timeout} s")
            time.sleep(0.005)
