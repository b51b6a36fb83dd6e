"""A cache of recomputable arrays kept in DONTNEED objects (GEM_MADVISE).

Each entry is a 1 MiB float32 array that is cheap to recompute. Between uses the cache
marks its object DONTNEED: under memory pressure the manager may then purge it (drop its
pages) instead of spilling it to disk. Before using an entry the cache marks it WILLNEED;
the returned `retained` flag says whether the contents survived. A purged entry is closed
and recomputed. Purged is final: the object never comes back, so a new one is made.

Entries are copied out with `read_into` while WILLNEED, never kept as views: a view of a
DONTNEED object reads zeros once the object is purged (docs/REFERENCE.md, "Differences from the kernel").

    python dontneed_cache.py                 # embedded manager with a 16 MiB system budget
    python dontneed_cache.py --socket PATH   # a daemon, e.g. `ugem serve --system-budget 16M`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable

import numpy as np

import ugem
from ugem import Buffer

MiB = 1 << 20
SHAPE = (512, 512)  # float32: 1 MiB per entry
ENTRIES = 32


class RecomputableCache:
    """key -> array, stored in purgeable ugem objects."""

    def __init__(self, dev: ugem.Device, compute: Callable[[int], np.ndarray]) -> None:
        self.dev = dev
        self.compute = compute
        self.entries: dict[int, Buffer] = {}
        self.retained: list[int] = []
        self.recomputed: list[int] = []

    def get(self, key: int) -> np.ndarray:
        buf = self.entries.get(key)
        if buf is not None and buf.madvise(ugem.WILLNEED):  # still there, and safe from purging now
            out = np.empty(SHAPE, np.float32)
            buf.read_into(out)
            self.retained.append(key)
        else:
            if buf is not None:
                buf.close()  # purged: nothing left to keep
                self.recomputed.append(key)
            out = self.compute(key)
            buf = self.dev.new(out.nbytes)
            buf.write(out)
            self.entries[key] = buf
        buf.madvise(ugem.DONTNEED)  # purgeable again until the next get
        return out

    def close(self) -> None:
        for buf in self.entries.values():
            buf.close()


def compute(key: int) -> np.ndarray:
    """The 'expensive' computation: deterministic per key."""
    return np.random.default_rng(key).standard_normal(SHAPE, dtype=np.float32)


def run(dev: ugem.Device) -> int:
    budget = dev.stats()["system_budget"]
    total = ENTRIES * SHAPE[0] * SHAPE[1] * 4
    print(f"system budget {budget // MiB} MiB, cache of {ENTRIES} entries x 1 MiB = {total // MiB} MiB")
    if budget >= total:
        print("note: the budget holds every entry, so nothing will be purged "
              "(start the daemon with --system-budget 16M to see purging)")
    cache = RecomputableCache(dev, compute)
    try:
        for key in range(ENTRIES):  # pass 1: fill
            cache.get(key)
        print(f"pass 1: computed {ENTRIES} entries, all marked DONTNEED")
        wrong = 0
        for key in reversed(range(ENTRIES)):  # pass 2: newest first
            wrong += not np.array_equal(cache.get(key), compute(key))
        print(f"pass 2: {len(cache.retained)} retained (madvise(WILLNEED) -> True), "
              f"{len(cache.recomputed)} purged and recomputed (-> False)")
        if cache.recomputed:
            print(f"purged keys: {sorted(cache.recomputed)}")
        stats = dev.stats()
        print(f"stats: purged_total={stats['purged_total']} purgeable_bytes={stats['purgeable_bytes']} "
              f"resident_bytes={stats['resident_bytes']} spilled_bytes={stats['spilled_bytes']}")
        if wrong:
            print(f"{wrong} entries came back wrong")
            return 1
        print(f"all {ENTRIES} values correct")
    finally:
        cache.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="talk to the daemon at PATH instead of an embedded manager")
    args = parser.parse_args()
    if args.socket:
        with ugem.connect(args.socket) as dev:
            return run(dev)
    with tempfile.TemporaryDirectory() as spill, ugem.embedded(system_budget="16M", spill_dir=spill) as dev:
        return run(dev)


if __name__ == "__main__":
    sys.exit(main())
