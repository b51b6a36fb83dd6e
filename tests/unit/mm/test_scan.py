"""EvictionScan, in the manner of drm_mm_test.c's evict, evict_range and topdown/bottomup tests.

evict_nothing / evict_everything / evict_something follow the kernel helpers on a range
completely tiled by size-1 nodes (the scan must pick exactly the nodes under the hit, and
an EVICT insert must then fill the opened hole exactly).
"""

from __future__ import annotations

import random

import pytest

from ugem.errors import InvalidArgument, NoSpace
from ugem.mm import EvictionScan, InsertMode, Node, RangeAllocator

TOTAL = 512
EVICT_MODES = [InsertMode.LOW, InsertMode.HIGH, InsertMode.BEST]


def snapshot(mm: RangeAllocator[object]) -> tuple[object, ...]:
    """Everything the allocator holds, including the hole stack order and the scan marks."""
    return (
        mm.dump(),
        list(mm._holes.items()),
        list(mm._hole_at_end.items()),
        list(mm._by_addr),
        list(mm._by_size),
        list(mm._node_addrs),
        [(node.start, node.size, node.owner, node._scanned) for node in mm],
        mm._used,
        mm._scan,
        mm._scanned,
    )


def assert_continuous(mm: RangeAllocator[object], size: int) -> None:
    mm._check()
    assert list(mm.holes()) == []
    assert [node.start for node in mm] == list(range(mm.start, mm.end, size))


def assert_one_hole(mm: RangeAllocator[object], start: int, end: int) -> None:
    mm._check()
    assert list(mm.holes()) == [(start, end)]


def run_scan(scan: EvictionScan[object], candidates: list[Node[object]]) -> list[Node[object]]:
    """The roster loop every caller writes: add until found, remove in reverse, keep the flagged."""
    roster = []
    for node in candidates:
        roster.append(node)
        if scan.add(node):
            break
    victims = [node for node in reversed(roster) if scan.remove(node)]
    scan.finish()
    return victims


@pytest.fixture
def tiled() -> tuple[RangeAllocator[object], list[Node[object]]]:
    mm: RangeAllocator[object] = RangeAllocator(0, TOTAL)
    nodes = [mm.insert(1, owner=n) for n in range(TOTAL)]
    return mm, nodes


def test_evict_nothing_leaves_the_allocator_exactly_as_it_was(tiled):
    mm, nodes = tiled
    before = snapshot(mm)
    scan: EvictionScan[object] = EvictionScan(mm, 1)
    for node in nodes:
        scan.add(node)
    assert scan.found
    for node in reversed(nodes):
        scan.remove(node)
    scan.finish()
    assert all(node.allocated for node in nodes)
    assert snapshot(mm) == before
    assert_continuous(mm, 1)


def test_evict_everything_flags_every_node(tiled):
    mm, nodes = tiled
    scan: EvictionScan[object] = EvictionScan(mm, TOTAL)
    victims = run_scan(scan, nodes)
    assert (scan.hit_start, scan.hit_end) == (0, TOTAL)
    assert len(victims) == TOTAL
    for node in victims:
        mm.remove(node)
    assert_one_hole(mm, 0, TOTAL)
    for node in victims:
        mm.reserve(node.start, node.size, owner=node.owner)
    assert_continuous(mm, 1)


def evict_something(
    mm: RangeAllocator[object],
    nodes: list[Node[object]],
    rng: random.Random,
    size: int,
    alignment: int,
    mode: InsertMode,
    range_start: int | None = None,
    range_end: int | None = None,
) -> list[Node[object]]:
    order = list(nodes)
    rng.shuffle(order)
    scan: EvictionScan[object] = EvictionScan(
        mm, size, alignment=alignment, mode=mode, range_start=range_start, range_end=range_end
    )
    victims = run_scan(scan, order)
    assert victims, f"no eviction found: size={size} alignment={alignment} {mode.name}"
    assert scan.hit_start is not None and scan.hit_end is not None
    assert all(node.start < scan.hit_end and node.end > scan.hit_start for node in victims)
    assert sum(node.size for node in victims) == size  # size-1 tiles: exactly the hit
    for node in victims:
        mm.remove(node)
    new = mm.insert(size, alignment=alignment, mode=InsertMode.EVICT, range_start=range_start, range_end=range_end)
    lo = mm.start if range_start is None else range_start
    hi = mm.end if range_end is None else range_end
    assert lo <= new.start and new.end <= hi
    assert new.start % alignment == 0
    assert (new.start, new.end) == (scan.hit_start, scan.hit_end), "insert did not fill the eviction hole"
    mm._check()
    mm.remove(new)
    replaced = [mm.reserve(node.start, node.size, owner=node.owner) for node in victims]
    assert_continuous(mm, 1)
    for old, fresh in zip(victims, replaced, strict=True):
        nodes[nodes.index(old)] = fresh
    return victims


@pytest.mark.parametrize("mode", EVICT_MODES, ids=lambda m: m.name)
def test_evict_something(tiled, mode, rng):
    mm, nodes = tiled
    size = 1
    while size <= TOTAL:
        evict_something(mm, nodes, rng, size, 1, mode)
        size <<= 1
    alignment = 1
    while alignment < TOTAL:
        evict_something(mm, nodes, rng, TOTAL // 2, alignment, mode)
        alignment <<= 1
    for prime in [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]:
        evict_something(mm, nodes, rng, (TOTAL - prime + 1) // 2, prime, mode)


@pytest.mark.parametrize("mode", EVICT_MODES, ids=lambda m: m.name)
def test_evict_range(tiled, mode, rng):
    mm, nodes = tiled
    range_size, range_start = TOTAL // 2, TOTAL // 4
    range_end = range_start + range_size
    size = 1
    while size <= range_size:
        evict_something(mm, nodes, rng, size, 1, mode, range_start, range_end)
        evict_something(mm, nodes, rng, range_size // 2, size, mode, range_start, range_end)
        size <<= 1


def hand_made() -> tuple[RangeAllocator[str], dict[str, Node[str]]]:
    """A=[0,10) hole [10,20) B=[20,30) C=[30,40) D=[40,70) E=[70,100)."""
    mm: RangeAllocator[str] = RangeAllocator(0, 100)
    nodes = {name: mm.reserve(start, size, owner=name) for name, start, size in
             [("A", 0, 10), ("B", 20, 10), ("C", 30, 10), ("D", 40, 30), ("E", 70, 30)]}
    return mm, nodes


@pytest.mark.parametrize(
    ("mode", "lru", "hit", "evicted", "placed"),
    [
        # C alone is 10; A + the hole is 20; D joins C: [30,70) takes 25 at the bottom.
        (InsertMode.LOW, "CAD", (30, 55), "DC", 30),
        # At the top of [30,70) the hit [45,70) lies inside D: C is spared.
        (InsertMode.HIGH, "CAD", (45, 70), "D", 40),
        # B joins A + the hole and C: [0,40) takes 25 at the bottom -> B and A, C is spared.
        (InsertMode.LOW, "ACB", (0, 25), "BA", 0),
        # The same stretch from the top: [15,40) -> B and C, A is spared.
        (InsertMode.HIGH, "ACB", (15, 40), "BC", 10),
    ],
)
def test_scan_evicts_only_nodes_overlapping_the_hit(mode, lru, hit, evicted, placed):
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 25, mode=mode)
    victims = run_scan(scan, [nodes[name] for name in lru])
    assert (scan.hit_start, scan.hit_end) == hit
    assert "".join(str(node.owner) for node in victims) == evicted
    for node in victims:
        mm.remove(node)
    opened = [(start, end) for start, end in mm.holes() if start <= hit[0] and hit[1] <= end]
    # EVICT takes the newest hole, the one the last eviction merged, from its bottom.
    new = mm.insert(25, mode=InsertMode.EVICT)
    assert new.start == placed == opened[0][0]
    mm._check()


def test_scan_counts_real_holes_next_to_candidates():
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 20, mode=InsertMode.LOW)
    assert scan.add(nodes["A"])  # A's 10 plus the hole [10,20) after it
    assert (scan.hit_start, scan.hit_end) == (0, 20)
    assert scan.remove(nodes["A"])
    scan.finish()


def test_scan_honours_alignment_and_range():
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 16, alignment=16, range_start=40, range_end=100)
    assert not scan.add(nodes["C"])  # C alone, [30,40), lies outside the range
    assert scan.add(nodes["D"])  # C + D = [30,70), clipped to [40,70): 48 is aligned, 48+16 <= 70
    assert (scan.hit_start, scan.hit_end) == (48, 64)
    assert scan.remove(nodes["D"])
    assert not scan.remove(nodes["C"])
    scan.finish()


def test_a_later_success_moves_the_hit_and_a_failure_keeps_it():
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 20, mode=InsertMode.LOW)
    assert scan.add(nodes["E"])
    assert (scan.hit_start, scan.hit_end) == (70, 90)
    assert not scan.add(nodes["C"])  # C alone is 10: the hit stays
    assert (scan.hit_start, scan.hit_end) == (70, 90)
    assert scan.add(nodes["A"])  # A + hole = [0,20)
    assert (scan.hit_start, scan.hit_end) == (0, 20)
    assert [scan.remove(nodes[n]) for n in "ACE"] == [True, False, False]
    scan.finish()


def test_remove_out_of_reverse_order_asserts():
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 50)
    scan.add(nodes["A"])
    scan.add(nodes["B"])
    with pytest.raises(AssertionError, match="reverse order|mirror add"):
        scan.remove(nodes["A"])
    with pytest.raises(AssertionError):
        scan.remove(nodes["C"])  # never added
    scan.remove(nodes["B"])
    scan.remove(nodes["A"])
    with pytest.raises(AssertionError):
        scan.remove(nodes["A"])  # nothing left to remove
    scan.finish()
    mm._check()


def test_allocator_refuses_mutation_while_a_scan_holds_nodes():
    mm, nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 50)
    scan.add(nodes["C"])
    with pytest.raises(AssertionError):
        mm.insert(1)
    with pytest.raises(AssertionError):
        mm.reserve(10, 1)
    with pytest.raises(AssertionError):
        mm.remove(nodes["A"])
    with pytest.raises(AssertionError):
        EvictionScan(mm, 10)  # a second scan
    with pytest.raises(AssertionError):
        scan.add(nodes["C"])  # twice
    with pytest.raises(AssertionError):
        scan.finish()  # still holding C
    mm._check()
    scan.remove(nodes["C"])
    scan.finish()
    mm.insert(1)  # allowed again
    mm._check()


def test_scan_refuses_nodes_of_another_allocator():
    mm, _ = hand_made()
    other, other_nodes = hand_made()
    scan: EvictionScan[str] = EvictionScan(mm, 10)
    with pytest.raises(AssertionError):
        scan.add(other_nodes["A"])
    scan.finish()


def test_scan_that_finds_nothing_restores_everything_and_flags_nothing():
    mm, nodes = hand_made()
    mm.insert(5, mode=InsertMode.HIGH)  # make the hole stack order non-trivial
    before = snapshot(mm)
    scan: EvictionScan[str] = EvictionScan(mm, 37, alignment=64)  # 0 and 64 are the only aligned starts
    order = [nodes[n] for n in "DBEAC"]
    assert not any(scan.add(node) for node in order)
    assert not scan.found
    assert not any(scan.remove(node) for node in reversed(order))
    scan.finish()
    assert snapshot(mm) == before
    mm._check()


def test_scan_as_a_context_manager_checks_it_finished():
    mm, nodes = hand_made()
    with EvictionScan(mm, 10) as scan:
        scan.add(nodes["A"])
        scan.remove(nodes["A"])
    with pytest.raises(AssertionError):
        with EvictionScan(mm, 10) as scan:
            scan.add(nodes["A"])
    scan.remove(nodes["A"])  # clean up the scan the failed block left behind
    mm._check()


def test_impossible_scans_are_refused_up_front():
    mm, _ = hand_made()
    with pytest.raises(NoSpace):
        EvictionScan(mm, 0)
    with pytest.raises(NoSpace):
        EvictionScan(mm, 101)
    with pytest.raises(NoSpace):
        EvictionScan(mm, 20, range_start=90, range_end=100)
    with pytest.raises(InvalidArgument):
        EvictionScan(mm, 1, range_start=50, range_end=40)
    with pytest.raises(InvalidArgument):
        EvictionScan(mm, 1, alignment=-4)


def test_large_random_rosters_restore_exactly(rng):
    mm: RangeAllocator[object] = RangeAllocator(0, 1 << 20)
    nodes = [mm.insert(rng.randrange(1, 512), mode=rng.choice(list(InsertMode))) for _ in range(2000)]
    for node in rng.sample(nodes, 700):
        mm.remove(node)
        nodes.remove(node)
    before = snapshot(mm)
    for _ in range(20):
        scan: EvictionScan[object] = EvictionScan(
            mm, rng.randrange(1, 8192), alignment=rng.choice([1, 64, 4096]), mode=rng.choice(EVICT_MODES)
        )
        roster = rng.sample(nodes, len(nodes))
        for node in roster:
            scan.add(node)
        for node in reversed(roster):
            scan.remove(node)
        scan.finish()
        assert snapshot(mm) == before
