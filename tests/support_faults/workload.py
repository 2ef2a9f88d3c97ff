"""An application workload that keeps writing to the backfilled table while the engine runs.

Three kinds of threads work on keys just around the backfill's current position (where the
contention is): multi-row updaters that lock rows in *descending* key order (the backfill goes
ascending, so deadlocks happen for real), deleters, and inserters (into the key gaps inside the
run's range and beyond its upper bound). Every committed change is recorded, so the expected
final state of each pre-existing row is computable. The workload never touches ``grp`` or
``counter`` (the backfill's where and set).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

import psycopg

from .app_threads import AppThreads

APP_STATEMENT_TIMEOUT = "5s"
"""No application statement may wait forever (the test's time stays bounded)."""


class Workload(AppThreads):
    def __init__(self, dsn: str, position: Callable[[], int], *, step: int, max_key: int, spread: int) -> None:
        self.dsn, self.position, self.step, self.max_key, self.spread = dsn, position, step, max_key, spread
        self.increments: Counter[int] = Counter()
        self.deleted: set[int] = set()
        self.inserted_inside: dict[int, int] = {}
        """Gap keys inside the run's range -> their counter when inserted."""
        self.inserted_beyond: dict[int, int] = {}
        """Keys above the run's upper bound -> their counter when inserted."""
        self.commits = 0
        self.deadlocks = 0
        self.timeouts = 0
        super().__init__()

    # -- keys ---------------------------------------------------------------------------------

    def _near(self, rng: random.Random) -> int:
        """A pre-existing key (a multiple of ``step``) around the backfill's position."""
        centre = self.position()
        key = centre + rng.randrange(-self.spread, self.spread)
        key = min(self.max_key, max(self.step, key - key % self.step))
        return key

    # -- the three kinds of application transactions --------------------------------------------

    def _update_two(self, conn: psycopg.Connection, rng: random.Random) -> None:
        high = self._near(rng)
        low = max(self.step, high - self.step * rng.randrange(1, 40))
        keys = [high, low] if high != low else [high]
        with conn.transaction():
            changed = [
                conn.execute("UPDATE items SET app_counter = app_counter + 1 WHERE id = %s", [key]).rowcount
                for key in keys
            ]
            time.sleep(0.003)  # hold the locks a moment, as real application transactions do
        with self._lock:
            for key, n in zip(keys, changed, strict=False):
                self.increments[key] += n

    def _delete(self, conn: psycopg.Connection, rng: random.Random) -> None:
        key = self._near(rng)
        if conn.execute("DELETE FROM items WHERE id = %s", [key]).rowcount:
            with self._lock:
                self.deleted.add(key)

    def _insert(self, conn: psycopg.Connection, rng: random.Random) -> None:
        inside = rng.random() < 0.5
        if inside:  # an odd key: a gap between seeded keys, matching the where (grp 0)
            key = min(self._near(rng), self.max_key - self.step) + 1
        else:
            key = self.max_key + rng.randrange(1, 10_000_000)
        counter = rng.randrange(0, 1000)
        inserted = conn.execute(
            "INSERT INTO items (id, grp, counter, payload) VALUES (%s, 0, %s, 'app') ON CONFLICT DO NOTHING",
            [key, counter],
        ).rowcount
        if inserted:
            with self._lock:
                (self.inserted_inside if inside else self.inserted_beyond)[key] = counter

    # -- threads ------------------------------------------------------------------------------

    def _worker(self, seed: int, actions: list[Callable[[psycopg.Connection, random.Random], None]]) -> None:
        rng = random.Random(seed)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", [APP_STATEMENT_TIMEOUT])
            # Detect deadlocks sooner than the backfill's lockTimeout gives up, so they happen.
            conn.execute("SET deadlock_timeout = '50ms'")
            while not self._stop.is_set():
                try:
                    rng.choice(actions)(conn, rng)
                    with self._lock:
                        self.commits += 1
                except psycopg.errors.DeadlockDetected:
                    with self._lock:
                        self.deadlocks += 1
                except psycopg.errors.QueryCanceled:
                    with self._lock:
                        self.timeouts += 1
                time.sleep(0.001)

    def start(self, updaters: int = 2, deleters: int = 1, inserters: int = 1) -> Workload:
        plan = [[self._update_two]] * updaters + [[self._delete]] * deleters + [[self._insert]] * inserters
        for number, actions in enumerate(plan):
            self.spawn(self._worker, number, actions, name=f"app-{number}")
        super().start()
        return self
