"""Pure adaptive batch sizing: steer the keys per batch toward ``batch.targetDuration``.

The cost of one key is smoothed (EWMA) so one odd batch does not whipsaw the size; growth is
bounded (at most ``MAX_GROWTH`` per batch) because a too-large batch holds row locks longer,
while a batch slower than ``SLOW_FACTOR`` x target shrinks the size at once (no smoothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MAX_GROWTH = 1.5
SLOW_FACTOR = 1.5
SMOOTHING = 0.3
"""Weight of the newest batch in the per-key cost average."""


@dataclass(frozen=True)
class BatchSizer:
    size: int
    min_size: int
    max_size: int
    target_seconds: float
    """0 keeps ``size`` fixed."""
    seconds_per_key: float | None = None

    def clamp(self, size: float) -> int:
        return max(self.min_size, min(self.max_size, int(size)))

    def observe(self, keys: int, seconds: float) -> BatchSizer:
        """The sizer after a committed batch of ``keys`` keys whose transaction took ``seconds``."""
        if self.target_seconds <= 0 or keys <= 0:
            return self
        cost = max(seconds, 1e-6) / keys
        if seconds > SLOW_FACTOR * self.target_seconds:
            # Fast shrink: size the next batch from this batch's cost alone.
            return replace(self, size=self.clamp(self.target_seconds / cost), seconds_per_key=cost)
        smoothed = cost if self.seconds_per_key is None else SMOOTHING * cost + (1 - SMOOTHING) * self.seconds_per_key
        wanted = self.target_seconds / smoothed
        if keys >= self.size:  # only a full batch says anything about a larger one
            wanted = min(wanted, self.size * MAX_GROWTH)
        else:
            wanted = min(wanted, self.size)
        return replace(self, size=self.clamp(wanted), seconds_per_key=smoothed)

    def halve(self) -> BatchSizer:
        """After repeated timeouts: the batch was too big for the current contention."""
        return replace(self, size=self.clamp(self.size / 2))

    def retune(self, *, min_size: int, max_size: int, target_seconds: float, size: int | None = None) -> BatchSizer:
        """Apply live tuning; ``size`` (a changed starting size) replaces the current size."""
        updated = replace(self, min_size=min_size, max_size=max_size, target_seconds=target_seconds)
        return replace(updated, size=updated.clamp(self.size if size is None else size))
