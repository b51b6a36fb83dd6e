"""Many processes far beyond the system budget, in the spirit of IGT gem_shrink (gem-reference
§4.3 last bullet, §5.5 rows 65-67; SPEC §3 "budget").

A daemon runs with `--system-budget 64M`. Six child processes, each its own client, create
objects, populate them (pwrite, or writes through a mapping), mark them DONTNEED and never
close them: 6 x 48 MiB together, 4.5 times the budget. Meanwhile another client polls
`stats()`. The daemon must survive, keep resident memory within the budget (plus, when
pages are written through mappings, what each child can write before its next request),
and purge. In the mixed variants every other object stays WILLNEED: those are spilled
instead, and every byte of them must read back intact.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import pytest

from ugem.testing import run_daemon

MiB = 1 << 20
BUDGET = 64 * MiB
CHILDREN = 6
SIZE = 4 * MiB
PER_CHILD = 12  # x SIZE = 48 MiB per child
TIMEOUT = 120.0

CHILD = r"""
import json, sys
import numpy as np
import ugem

path, populate, mix, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
count, size = int(sys.argv[5]), int(sys.argv[6])

def data(i):
    return np.random.default_rng(seed * 1000 + i).bytes(size)

kept = {}
with ugem.connect(path) as dev:
    for i in range(count):
        h = dev.create(size)
        if populate == "mmap":
            view = dev.mmap(h)
            view[:] = data(i)
            del view
        else:
            dev.pwrite(h, 0, data(i))
        if mix == "mixed" and i % 2 == 0:
            kept[h] = i
        else:
            assert dev.madvise(h, ugem.DONTNEED) in (True, False)
    print(json.dumps({"populated": count}), flush=True)
    sys.stdin.readline()  # hold every object (never closed) until the parent has looked
    bad = [h for h, i in kept.items() if dev.pread(h, 0, size) != data(i)]
    placements = {}
    for h in range(1, count + 1):
        p = dev.info(h).placement
        placements[p] = placements.get(p, 0) + 1
    print(json.dumps({"verified": len(kept), "bad": bad, "placements": placements}), flush=True)
"""


class Child:
    def __init__(self, stack: ExitStack, path: str, populate: str, mix: str, seed: int, log: str) -> None:
        self.log = log
        with open(log, "wb") as err:  # the child has its own copy of the fd
            self.proc = stack.enter_context(subprocess.Popen(
                [sys.executable, "-c", CHILD, path, populate, mix, str(seed), str(PER_CHILD), str(SIZE)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err))
        self.buffer = b""

    def line(self) -> dict[str, Any] | None:
        """The next line the child printed, if one is complete (never blocks)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer and select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            self.buffer += chunk
        if b"\n" not in self.buffer:
            if self.proc.poll() not in (None, 0):
                with open(self.log) as f:
                    raise AssertionError(f"child {self.proc.pid} failed:\n{f.read()}")
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return dict(json.loads(line))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()


def _wait_lines(children: list[Child], watch: Any) -> list[dict[str, Any]]:
    """One line from every child, calling `watch()` all the while."""
    lines: list[dict[str, Any] | None] = [None] * len(children)
    deadline = time.monotonic() + TIMEOUT
    while any(line is None for line in lines):
        watch()
        for k, child in enumerate(children):
            if lines[k] is None:
                lines[k] = child.line()
        assert time.monotonic() < deadline, f"children did not finish in {TIMEOUT} s: {lines}"
        time.sleep(0.02)
    return [line for line in lines if line is not None]


@pytest.mark.parametrize("populate", ["pwrite", "mmap"])
@pytest.mark.parametrize("mix", ["dontneed", "mixed"])
def test_children_far_beyond_the_budget(tmp_path: Any, kit: Any, populate: str, mix: str) -> None:
    # pages written through a mapping count from the next request on: each child may be
    # one object ahead of the budget at any moment
    slack = CHILDREN * SIZE if populate == "mmap" else 0
    with run_daemon(system_budget="64M", env={**os.environ, **kit.WARNINGS_ENV}) as daemon, ExitStack() as stack:
        baseline = daemon.fd_count()
        watcher = stack.enter_context(daemon.connect())
        peak = {"resident": 0, "samples": 0}

        def watch() -> None:
            assert daemon.proc.poll() is None, f"the daemon died:\n{daemon.stderr_text()}"
            stats = watcher.stats()
            peak["resident"] = max(peak["resident"], stats["resident_bytes"])
            peak["samples"] += 1
            assert stats["resident_bytes"] <= BUDGET + slack, stats

        children = [Child(stack, daemon.path, populate, mix, seed, str(tmp_path / f"child{seed}.log"))
                    for seed in range(CHILDREN)]
        populated = _wait_lines(children, watch)
        assert populated == [{"populated": PER_CHILD}] * CHILDREN
        stats = watcher.stats()
        assert stats["objects"] == CHILDREN * PER_CHILD  # nothing was closed
        assert stats["resident_bytes"] <= BUDGET + slack, stats
        assert stats["purged_total"] > 0, stats
        assert peak["samples"] > 1 and peak["resident"] > BUDGET // 2, peak  # the watcher saw real load
        total = CHILDREN * PER_CHILD * SIZE
        # whatever is not resident went somewhere: purged (DONTNEED) or spilled (WILLNEED)
        assert stats["purged_total"] * SIZE + stats["spilled_bytes"] >= total - BUDGET - slack, stats
        if mix == "mixed":
            assert stats["spilled_total"] > 0, stats
            assert stats["purged_total"] <= total // SIZE // 2
        else:
            assert stats["spilled_total"] == 0, stats  # caches were there to purge: nothing spilled

        for child in children:
            child.go()
        results = _wait_lines(children, watch)
        for result in results:
            assert result["bad"] == [], result
            assert result["verified"] == (PER_CHILD // 2 if mix == "mixed" else 0)
        for child in children:
            assert child.proc.wait(timeout=30) == 0
        assert watcher.stats()["resident_bytes"] <= BUDGET + slack
        watcher.close()
        kit.wait_until(lambda: watcher_gone(daemon), what="every child released")
        kit.assert_healthy(daemon, baseline)
        with daemon.connect() as dev:
            final = dev.stats()
        assert (final["objects"], final["resident_bytes"], final["spilled_bytes"]) == (0, 0, 0), final


def watcher_gone(daemon: Any) -> bool:
    with daemon.connect() as dev:
        stats = dev.stats()
    return bool(stats["clients"] == 1 and stats["objects"] == 0)
