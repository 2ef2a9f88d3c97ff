"""Which Events to post: client-go's ``EventCorrelator`` rules, as a pure object.

The same three rules as Kubernetes' own recorders (``tools/record/events_cache.go``), with
the same defaults, so a Backfill that flaps cannot flood the API server or ``kubectl describe``:

* **Spam filter**: a token bucket per involved object (burst 25, one token back every 5 min).
  An Event without a token is dropped (the status still says what happened).
* **Aggregation**: more than 10 Events of the same object, type and reason with *different*
  messages within 10 min become one Event, "(combined from similar events): <latest message>".
* **Deduplication**: an Event identical to one posted before (same object, type, reason and
  message) within 10 min is not created again: the existing one's ``count`` and
  ``lastTimestamp`` are patched.

The caller does the I/O: :meth:`EventCorrelator.decide` says create (under which name) or
patch (which Event, to which count) or drop, and :meth:`EventCorrelator.posted` records a
successful create.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

SPAM_BURST = 25
SPAM_REFILL_SECONDS = 300.0
AGGREGATE_MAX_EVENTS = 10
AGGREGATE_WINDOW_SECONDS = 600.0
MAX_TRACKED = 4096
"""Objects and messages remembered (LRU), as client-go's caches: memory stays bounded."""
COMBINED = "(combined from similar events): "


@dataclass(frozen=True)
class EventDecision:
    action: Literal["create", "patch", "drop"]
    message: str = ""
    name: str = ""
    """For ``patch``: the Event to patch (the one created for this message)."""
    count: int = 1


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Seen:
    name: str
    count: int
    at: float


@dataclass
class _Similar:
    messages: set[str] = field(default_factory=set)
    since: float = 0.0


def _touch(cache: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_TRACKED:
        cache.popitem(last=False)


def _dedupe_key(obj: str, type_: str, reason: str, message: str) -> tuple[str, str, str, str]:
    # Aggregated Events share one key (the combined prefix hides the differing messages).
    return obj, type_, reason, COMBINED if message.startswith(COMBINED) else message


class EventCorrelator:
    def __init__(self) -> None:
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._similar: OrderedDict[tuple[str, str, str], _Similar] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str, str, str], _Seen] = OrderedDict()

    def _token(self, obj: str, now: float) -> bool:
        bucket = self._buckets.get(obj) or _Bucket(float(SPAM_BURST), now)
        bucket.tokens = min(float(SPAM_BURST), bucket.tokens + (now - bucket.at) / SPAM_REFILL_SECONDS)
        bucket.at = now
        _touch(self._buckets, obj, bucket)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _aggregate(self, obj: str, type_: str, reason: str, message: str, now: float) -> str:
        key = (obj, type_, reason)
        similar = self._similar.get(key)
        if similar is None or now - similar.since > AGGREGATE_WINDOW_SECONDS:
            similar = _Similar(since=now)
        similar.messages.add(message)
        _touch(self._similar, key, similar)
        return COMBINED + message if len(similar.messages) > AGGREGATE_MAX_EVENTS else message

    def decide(self, obj: str, type_: str, reason: str, message: str, now: float) -> EventDecision:
        """``obj``: the involved object's uid; ``now``: seconds on a monotonic clock."""
        if not self._token(obj, now):
            return EventDecision("drop")
        message = self._aggregate(obj, type_, reason, message, now)
        key = _dedupe_key(obj, type_, reason, message)
        seen = self._seen.get(key)
        if seen is not None and now - seen.at <= AGGREGATE_WINDOW_SECONDS:
            seen.count += 1
            seen.at = now
            _touch(self._seen, key, seen)
            return EventDecision("patch", message, seen.name, seen.count)
        return EventDecision("create", message)

    def posted(self, obj: str, type_: str, reason: str, message: str, name: str, now: float) -> None:
        """A created Event: identical ones are folded into it from now on."""
        _touch(self._seen, _dedupe_key(obj, type_, reason, message), _Seen(name, 1, now))

    def forget(self, obj: str, type_: str, reason: str, message: str) -> None:
        """The Event to patch is gone (Events expire after an hour): the next one is created."""
        self._seen.pop(_dedupe_key(obj, type_, reason, message), None)
