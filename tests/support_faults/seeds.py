"""One seed per randomized fault test: printed (pytest shows it with a failure) and replayable.

``BACKFILL_TEST_SEED=1234 python -m pytest -q tests/faults/test_fault_sigkill.py`` replays the
random choices of a failed run (kill moments, application keys); timing still varies.
"""

from __future__ import annotations

import os
import random

SEED_ENV = "BACKFILL_TEST_SEED"


def random_seed(test: str, default: int | None = None) -> int:
    """The seed for ``test``: ``$BACKFILL_TEST_SEED``, else ``default``, else a fresh one; always printed."""
    text = os.environ.get(SEED_ENV)
    seed = int(text) if text else default if default is not None else random.SystemRandom().randrange(2**32)
    print(f"{test}: random seed {seed} (replay: {SEED_ENV}={seed})")
    return seed


def seeded_random(test: str, default: int | None = None) -> random.Random:
    return random.Random(random_seed(test, default))
