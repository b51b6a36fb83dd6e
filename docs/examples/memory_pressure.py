"""Write three times the memory budget and read every byte back: the manager spills.

The manager keeps resident system memory under its `system_budget`. Writing more than
that makes it spill idle objects (least recently used first) to its spill storage and
bring them back transparently on the next use. Here 48 objects of 1 MiB are filled under
a 16 MiB budget, half through numpy views and half with `write` (pwrite), then every one
is checked. An object with a live view (a mapping) is never spilled, so each fill view is
dropped once filled; one view is kept on purpose to show that it stays in memory.

    python memory_pressure.py                 # embedded manager with a 16 MiB system budget
    python memory_pressure.py --socket PATH   # a daemon, e.g. `ugem serve --system-budget 16M`
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile

import numpy as np

import ugem

MiB = 1 << 20
COUNT = 48


def content(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 2**32, MiB // 4, dtype=np.uint32)


def run(dev: ugem.Device) -> int:
    budget = dev.stats()["system_budget"]
    print(f"system budget {budget // MiB} MiB; writing {COUNT} objects x 1 MiB = {COUNT} MiB")
    if budget >= COUNT * MiB:
        print("note: the budget holds everything, so nothing will spill "
              "(start the daemon with --system-budget 16M to see spilling)")
    bufs = [dev.new(MiB) for _ in range(COUNT)]
    try:
        kept = bufs[0].array(np.uint32)  # a live view: object 0 stays mapped, so never spilled
        kept[:] = content(0)
        for i, buf in enumerate(bufs[1:], start=1):
            if i % 2:
                view = buf.array(np.uint32)
                view[:] = content(i)
                del view  # last view gone: the mapping is released, the object may spill
            else:
                buf.write(content(i))
        places = collections.Counter(buf.info().placement for buf in bufs)
        stats = dev.stats()
        print(f"after writing: placements {dict(sorted(places.items()))}")
        print(f"stats: resident_bytes={stats['resident_bytes']} spilled_bytes={stats['spilled_bytes']} "
              f"spilled_total={stats['spilled_total']} bytes_moved_total={stats['bytes_moved_total']}")
        print(f"object 0 (mapped) is {bufs[0].info().placement}")
        bad = 0
        out = np.empty(MiB // 4, np.uint32)
        for i, buf in enumerate(bufs):
            buf.read_into(out)  # restores spilled objects transparently
            bad += not np.array_equal(out, content(i))
        stats = dev.stats()
        print(f"read back: {COUNT - bad} of {COUNT} objects intact; resident_bytes={stats['resident_bytes']} "
              f"(<= budget: {stats['resident_bytes'] <= budget}), spilled_total={stats['spilled_total']}")
        del kept
    finally:
        for buf in bufs:
            buf.close()
    if bad:
        return 1
    print("everything read back")
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
