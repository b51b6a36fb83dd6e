"""RangeAllocator and EvictionScan against a brute-force interval-list model.

The model is a list of (start, end) intervals and nothing else: holes are recomputed from
it on every step, and placements are found by trying every aligned address in every hole
in the order each InsertMode promises. EVICT's order depends on hole recency, which the
model does not track, so an EVICT insert is checked for validity (inside one hole, aligned,
in range, at the bottom of its hole) and, right after an eviction scan, for landing in the
hole the scan opened. Every step ends with `_check()` and a comparison of the node sets.

Seeds: Hypothesis draws a fresh seed per run; a failure prints the shrunk step sequence
and a ``@reproduce_failure`` blob (``print_blob=True``). Replay a whole run with
``pytest --hypothesis-seed=<n>``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ugem.errors import NoSpace
from ugem.mm import EvictionScan, InsertMode, Node, RangeAllocator

PLACING_MODES = [InsertMode.BEST, InsertMode.LOW, InsertMode.HIGH]
sizes = st.integers(min_value=-2, max_value=80)
alignments = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64])
Interval = tuple[int, int]


def brute_fit(hole: Interval, size: int, alignment: int, mode: InsertMode, lo: int, hi: int) -> int | None:
    """Every aligned start that fits in hole ∩ [lo, hi); the top one for HIGH, else the bottom one."""
    if size <= 0:
        return None
    alignment = max(alignment, 1)
    first, last = max(hole[0], lo), min(hole[1], hi) - size
    fits = [start for start in range(first, last + 1) if start % alignment == 0]
    if not fits:
        return None
    return fits[-1] if mode is InsertMode.HIGH else fits[0]


def gaps(intervals: list[Interval], start: int, end: int) -> list[Interval]:
    """The free stretches of [start, end) around sorted, non-overlapping intervals."""
    free, addr = [], start
    for lo, hi in sorted(intervals):
        if lo > addr:
            free.append((addr, lo))
        addr = hi
    if addr < end:
        free.append((addr, end))
    return free


def expected_insert(holes: list[Interval], size: int, alignment: int, mode: InsertMode, lo: int, hi: int) -> int | None:
    order = {
        InsertMode.BEST: sorted(holes, key=lambda h: (h[1] - h[0], h[0])),
        InsertMode.LOW: sorted(holes),
        InsertMode.HIGH: sorted(holes, reverse=True),
    }[mode]
    for hole in order:
        start = brute_fit(hole, size, alignment, mode, lo, hi)
        if start is not None:
            return start
    return None


class RangeModel(RuleBasedStateMachine):
    mm: RangeAllocator[int]

    @initialize(start=st.sampled_from([0, 7, 4096]), size=st.integers(min_value=1, max_value=400))
    def create(self, start: int, size: int) -> None:
        self.mm = RangeAllocator(start, size)
        self.model: dict[Node[int], Interval] = {}
        self.serial = 0

    # -- helpers ---------------------------------------------------------------------------

    def holes(self) -> list[Interval]:
        return gaps(list(self.model.values()), self.mm.start, self.mm.end)

    def draw_range(self, data: st.DataObject) -> tuple[int | None, int | None]:
        if data.draw(st.booleans(), label="whole range"):
            return None, None
        a = data.draw(st.integers(self.mm.start - 5, self.mm.end + 5), label="range a")
        b = data.draw(st.integers(self.mm.start - 5, self.mm.end + 5), label="range b")
        return min(a, b), max(a, b) + 1

    def record(self, node: Node[int]) -> None:
        assert node.allocated and node.owner == self.serial
        assert not any(s < node.end and node.start < e for s, e in self.model.values())
        self.model[node] = (node.start, node.end)

    def check_evict_placement(self, node: Node[int], holes: list[Interval], size: int, alignment: int,
                              lo: int, hi: int) -> Interval:
        """An EVICT node lies at the bottom of one of the holes it could have used."""
        hole = next(h for h in holes if h[0] <= node.start and node.end <= h[1])
        assert node.start == brute_fit(hole, size, alignment, InsertMode.LOW, lo, hi)
        return hole

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data(), size=sizes, alignment=alignments, mode=st.sampled_from(PLACING_MODES))
    def insert(self, data: st.DataObject, size: int, alignment: int, mode: InsertMode) -> None:
        range_start, range_end = self.draw_range(data)
        lo = self.mm.start if range_start is None else range_start
        hi = self.mm.end if range_end is None else range_end
        expected = expected_insert(self.holes(), size, alignment, mode, lo, hi)
        self.serial += 1
        try:
            node = self.mm.insert(size, alignment=alignment, mode=mode, range_start=range_start,
                                  range_end=range_end, owner=self.serial)
        except NoSpace:
            assert expected is None, f"{mode.name} refused {size}@{alignment}; model places it at {expected}"
            event(f"insert {mode.name}: NoSpace")
            return
        event(f"insert {mode.name}: placed")
        assert node.start == expected, f"{mode.name} placed at {node.start}, model says {expected}"
        self.record(node)

    @rule(data=st.data(), size=sizes, alignment=alignments)
    def insert_evict(self, data: st.DataObject, size: int, alignment: int) -> None:
        range_start, range_end = self.draw_range(data)
        lo = self.mm.start if range_start is None else range_start
        hi = self.mm.end if range_end is None else range_end
        holes = self.holes()
        possible = expected_insert(holes, size, alignment, InsertMode.LOW, lo, hi) is not None
        self.serial += 1
        try:
            node = self.mm.insert(size, alignment=alignment, mode=InsertMode.EVICT, range_start=range_start,
                                  range_end=range_end, owner=self.serial)
        except NoSpace:
            assert not possible
            return
        self.check_evict_placement(node, holes, size, alignment, lo, hi)
        self.record(node)

    @rule(data=st.data(), size=sizes)
    def reserve(self, data: st.DataObject, size: int) -> None:
        start = data.draw(st.integers(self.mm.start - 5, self.mm.end + 5), label="reserve start")
        fits = size > 0 and any(s <= start and start + size <= e for s, e in self.holes())
        self.serial += 1
        try:
            node = self.mm.reserve(start, size, owner=self.serial)
        except NoSpace:
            assert not fits
            return
        assert fits and (node.start, node.size) == (start, size)
        self.record(node)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.model, key=lambda n: n.start)), label="victim")
        self.mm.remove(node)
        del self.model[node]
        assert not node.allocated

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), size=st.integers(1, 120), alignment=alignments,
          mode=st.sampled_from(PLACING_MODES))
    def scan_evict_insert(self, data: st.DataObject, size: int, alignment: int, mode: InsertMode) -> None:
        """Scan an LRU-ordered subset, check the hit and the victims, evict, insert(EVICT)."""
        range_start, range_end = self.draw_range(data)
        lo = self.mm.start if range_start is None else range_start
        hi = self.mm.end if range_end is None else range_end
        if lo >= hi or size > hi - lo:
            return
        nodes = sorted(self.model, key=lambda n: n.start)
        lru = data.draw(st.permutations(nodes), label="lru order")
        lru = lru[: data.draw(st.integers(1, len(lru)), label="evictable")]
        before = self.mm.dump(), list(self.mm._holes.items()), list(self.mm._by_size)

        scan: EvictionScan[int] = EvictionScan(self.mm, size, alignment=alignment, mode=mode,
                                               range_start=range_start, range_end=range_end)
        roster: list[Node[int]] = []
        hit: Interval | None = None
        for node in lru:
            roster.append(node)
            # The model's stretch around this node: holes and scanned nodes count as free.
            taken = [iv for n, iv in self.model.items() if n not in roster]
            stretch = next(g for g in gaps(taken, self.mm.start, self.mm.end) if g[0] <= node.start < g[1])
            start = brute_fit(stretch, size, alignment, mode, lo, hi)
            assert scan.add(node) == (start is not None)
            if start is not None:
                hit = (start, start + size)
                break
        assert (scan.hit_start, scan.hit_end) == (hit if hit else (None, None))
        victims = [node for node in reversed(roster) if scan.remove(node)]
        scan.finish()
        assert victims == [n for n in reversed(roster) if hit and n.start < hit[1] and n.end > hit[0]]
        assert (self.mm.dump(), list(self.mm._holes.items()), list(self.mm._by_size)) == before
        event(f"scan {mode.name}: " + ("no hit" if hit is None else f"hit, {min(len(victims), 3)} victims (3 = 3+)"))
        if hit is None:
            return

        for node in victims:
            self.mm.remove(node)
            del self.model[node]
        holes = self.holes()
        opened = next(h for h in holes if h[0] <= hit[0] and hit[1] <= h[1])
        self.serial += 1
        new = self.mm.insert(size, alignment=alignment, mode=InsertMode.EVICT, range_start=range_start,
                             range_end=range_end, owner=self.serial)
        hole = self.check_evict_placement(new, holes, size, alignment, lo, hi)
        if victims:
            assert hole == opened, f"EVICT used {hole}, the scan opened {opened}"
        self.record(new)

    @rule(data=st.data())
    def nodes_in_range(self, data: st.DataObject) -> None:
        a = data.draw(st.integers(self.mm.start - 5, self.mm.end + 5), label="query a")
        b = data.draw(st.integers(self.mm.start - 5, self.mm.end + 5), label="query b")
        lo, hi = min(a, b), max(a, b)
        got = [(n.start, n.end) for n in self.mm.nodes_in_range(lo, hi)]
        assert got == sorted(iv for iv in self.model.values() if iv[0] < hi and iv[1] > lo)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        self.mm._check()
        assert [(n.start, n.end) for n in self.mm] == sorted(self.model.values())
        assert list(self.mm.holes()) == self.holes()
        assert self.mm.used == sum(e - s for s, e in self.model.values())
        assert self.mm.used + self.mm.free == self.mm.size


RangeModel.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_range_allocator_matches_the_interval_model = RangeModel.TestCase
