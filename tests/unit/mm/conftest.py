"""Fixtures for the mm tests: a seeded random generator that prints its seed.

Set UGEM_SEED=<n> to replay a run; otherwise each run draws a fresh seed (as drm_mm_test's
random_seed does) and pytest shows the printed seed with any failure.
"""

from __future__ import annotations

import os
import random

import pytest


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("UGEM_SEED", random.randrange(2**32)))
    print(f"UGEM_SEED={seed}")
    return random.Random(seed)
