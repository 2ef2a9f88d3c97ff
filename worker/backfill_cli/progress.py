"""Engine listeners for the terminal: a rich progress bar, or one JSON line per event."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from backfill_api.status import format_eta
from backfill_worker.observe.events import BatchCommitted, Event, RunFinished
from backfill_worker.observe.run_progress import RunProgress


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


class ProgressBar:
    """Percent, rows, rate, ETA, batch size and throttle reason over all shards of the run."""

    def __init__(self, console: Console, description: str) -> None:
        self.state = RunProgress()
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rows]} rows"),
            TextColumn("{task.fields[rate]} rows/s"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("batch {task.fields[batch]}"),
            TextColumn("[yellow]{task.fields[throttle]}"),
            console=console,
            transient=False,
        )
        self._started = False
        self._task: TaskID = self._progress.add_task(description, total=100, rows="0", rate="-", eta="-", batch="-", throttle="")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._refresh()
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if not self._started:  # shown from the first event: a validation error prints no empty bar
                self._started = True
                self._progress.start()
            self.state.apply(event, time.monotonic())
            self._refresh()

    def _refresh(self) -> None:
        s = self.state
        throttle = s.throttle_reason
        if s.next_window_start is not None:  # outside spec.schedule: say when it resumes
            throttle += f" until {s.next_window_start.astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}"
        self._progress.update(
            self._task,
            completed=s.percent,
            rows=f"{s.rows_updated:,}",
            rate=_rate(s.rows_per_second),
            eta=format_eta(s.eta_seconds) or "-",
            batch=f"{s.batch_size:,}" if s.batch_size else "-",
            throttle=f"throttled: {throttle}" if throttle else "",
        )


class JsonProgress:
    """One JSON object per engine event on ``stream`` (machine-readable, e.g. for scripts)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.state = RunProgress()
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            shard = self.state.apply(event, time.monotonic())
            record = {"event": type(event).__name__, **asdict(event)}
            if isinstance(event, (BatchCommitted, RunFinished)):
                record["percent"] = shard.percent
                record["rowsPerSecond"] = round(shard.rate.rows_per_second(), 1)
                record["eta"] = format_eta(shard.eta_seconds)
            self._stream.write(json.dumps(record, default=str) + "\n")
            self._stream.flush()
