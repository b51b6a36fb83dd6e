"""Lru: ordering, weights, families of LRUs, and the shrinker walk (drm_gem_lru_scan)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from ugem.mm import Lru


@dataclass(eq=False)
class Obj:
    """A stand-in buffer object: a name and a size in pages."""

    name: str
    pages: int = 1
    tags: list[str] = field(default_factory=list)  # unhashable on purpose: the Lru keys by id()

    def __repr__(self) -> str:
        return self.name


def names(lru: Lru[Obj]) -> str:
    return "".join(obj.name for obj in lru)


def make(*specs: tuple[str, int]) -> tuple[Lru[Obj], dict[str, Obj]]:
    lru: Lru[Obj] = Lru(weight=lambda obj: obj.pages)
    objs = {}
    for name, pages in specs:
        objs[name] = Obj(name, pages)
        lru.move_tail(objs[name])
    return lru, objs


def test_move_tail_orders_from_least_recently_used():
    lru, o = make(("a", 1), ("b", 1), ("c", 1))
    assert names(lru) == "abc"
    lru.move_tail(o["a"])
    assert names(lru) == "bca"
    lru.move_tail(o["a"])  # already at the tail
    assert names(lru) == "bca"
    assert len(lru) == 3 and lru.count == 3


def test_weights_add_up_and_are_read_once():
    lru, o = make(("a", 4), ("b", 16))
    assert lru.count == 20
    o["a"].pages = 0  # e.g. purged while still listed: the total does not drift
    lru.remove(o["a"])
    assert lru.count == 16
    lru.move_tail(o["a"])  # joining again reads the weight again
    assert lru.count == 16


def test_remove_and_membership():
    lru, o = make(("a", 1), ("b", 1))
    assert o["a"] in lru and Obj("a") not in lru
    lru.remove(o["a"])
    assert o["a"] not in lru and names(lru) == "b"
    with pytest.raises(KeyError):
        lru.remove(o["a"])
    assert not lru.discard(o["a"])


def test_default_weight_is_one_per_item():
    lru: Lru[str] = Lru()
    for item in ["x", "y", "z"]:
        lru.move_tail(item)
    assert lru.count == 3


def test_a_family_holds_each_item_on_one_lru_at_most():
    willneed, o = make(("a", 2), ("b", 3))
    dontneed: Lru[Obj] = Lru(weight=lambda obj: obj.pages, shares_with=willneed)
    unbacked: Lru[Obj] = Lru(weight=lambda obj: obj.pages, shares_with=dontneed)
    dontneed.move_tail(o["a"])  # madvise(DONTNEED)
    assert names(willneed) == "b" and names(dontneed) == "a"
    assert (willneed.count, dontneed.count) == (3, 2)
    unbacked.move_tail(o["a"])  # purged
    assert o["a"] in unbacked and o["a"] not in dontneed and dontneed.count == 0
    with pytest.raises(KeyError):
        dontneed.remove(o["a"])  # remove() is strict: only this LRU
    assert willneed.discard(o["a"])  # discard() takes it off whichever LRU holds it
    assert o["a"] not in unbacked and unbacked.count == 0


def test_unrelated_lrus_do_not_share_items():
    one, o = make(("a", 1))
    two: Lru[Obj] = Lru()
    two.move_tail(o["a"])
    assert o["a"] in one and o["a"] in two


def test_scan_frees_from_the_head_until_enough():
    lru, o = make(("a", 4), ("b", 4), ("c", 4), ("d", 4))
    shrunk = []

    def shrink(obj: Obj) -> bool:
        shrunk.append(obj.name)
        lru.remove(obj)
        return True

    assert lru.scan(6, shrink) == 8  # a then b: the second one crosses the target
    assert shrunk == ["a", "b"] and names(lru) == "cd" and lru.count == 8


def test_scan_keeps_refused_items_in_order_at_the_tail():
    lru, o = make(("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1))
    offered = []

    def shrink(obj: Obj) -> bool:
        offered.append(obj.name)
        if obj.name in "bd":
            lru.remove(obj)
            return True
        return False

    assert lru.scan(2, shrink) == 2
    assert offered == ["a", "b", "c", "d"]
    assert names(lru) == "eac"  # the walk never reached e; a and c go to the tail, in order
    assert lru.count == 3


def test_scan_without_rotating_puts_refused_items_back_at_the_head():
    lru, o = make(("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1))

    def shrink(obj: Obj) -> bool:
        if obj.name == "c":
            lru.remove(obj)
            return True
        return False

    assert lru.scan(1, shrink, rotate=False) == 1
    assert names(lru) == "abde"  # a and b were offered and refused: still the oldest


def test_scan_stops_once_until_says_so():
    lru, o = make(("a", 1), ("b", 1), ("c", 1))
    offered: list[str] = []
    assert lru.scan(100, lambda obj: offered.append(obj.name) is not None, rotate=False,
                    until=lambda: len(offered) == 2) == 0
    assert offered == ["a", "b"] and names(lru) == "abc"


def test_scan_offers_each_item_once_and_stops_when_empty():
    lru, o = make(("a", 1), ("b", 1))
    offered = []
    assert lru.scan(100, lambda obj: offered.append(obj.name) is not None) == 0
    assert offered == ["a", "b"] and names(lru) == "ab"


def test_scan_of_nothing_offers_nothing():
    lru, _ = make(("a", 1))
    assert lru.scan(0, lambda obj: pytest.fail("offered")) == 0
    empty: Lru[Obj] = Lru()
    assert empty.scan(10, lambda obj: pytest.fail("offered")) == 0


def test_successful_shrink_must_take_the_item_off_the_lru():
    lru, o = make(("a", 1), ("b", 1))
    with pytest.raises(AssertionError, match="left a on the LRU"):
        lru.scan(1, lambda obj: True)
    assert names(lru) == "ba"  # the walk ended; the parked item went back to the tail
    assert lru.count == 2


def test_shrink_may_move_items_to_another_lru_of_the_family():
    shrinkable, o = make(("a", 2), ("b", 3), ("c", 5))
    purged: Lru[Obj] = Lru(weight=lambda obj: obj.pages, shares_with=shrinkable)

    def purge(obj: Obj) -> bool:
        purged.move_tail(obj)
        return True

    assert shrinkable.scan(5, purge) == 5
    assert names(shrinkable) == "c" and names(purged) == "ab"
    assert (shrinkable.count, purged.count) == (5, 5)


def test_shrink_may_touch_other_items():
    lru, o = make(("a", 1), ("b", 1), ("c", 1), ("d", 1))

    def shrink(obj: Obj) -> bool:
        if obj.name == "a":
            lru.remove(o["b"])  # e.g. freeing a shared parent
            lru.move_tail(obj)  # touched while being looked at: back into the walk order
            return False
        lru.remove(obj)
        return True

    assert lru.scan(1, shrink) == 1
    assert names(lru) == "da"


def test_scan_restores_the_list_when_shrink_raises():
    lru, o = make(("a", 1), ("b", 1), ("c", 1))

    def shrink(obj: Obj) -> bool:
        if obj.name == "b":
            raise RuntimeError("backing store failed")
        return False

    with pytest.raises(RuntimeError):
        lru.scan(3, shrink)
    assert names(lru) == "cab" and lru.count == 3 and len(lru) == 3


def test_scan_is_not_reentrant():
    lru, o = make(("a", 1), ("b", 1))

    def shrink(obj: Obj) -> bool:
        lru.scan(1, lambda inner: False)
        return False

    with pytest.raises(AssertionError, match="re-entrant"):
        lru.scan(1, shrink)
    assert names(lru) == "ba"


def test_iteration_during_a_scan_sees_parked_items_last():
    lru, o = make(("a", 1), ("b", 1), ("c", 1))
    seen = []

    def shrink(obj: Obj) -> bool:
        seen.append(names(lru))
        assert len(lru) == 3 and obj in lru
        return False

    lru.scan(2, shrink)
    assert seen == ["bca", "cab", "abc"]


def test_operations_stay_constant_time():
    lru: Lru[Obj] = Lru()
    objs = [Obj(str(n)) for n in range(100_000)]
    began = time.perf_counter()
    for obj in objs:
        lru.move_tail(obj)
    for obj in objs[::2]:
        lru.move_tail(obj)
    for obj in objs[1::4]:
        lru.remove(obj)

    def shrink(obj: Obj) -> bool:
        lru.remove(obj)
        return True

    assert lru.scan(50_000, shrink) == 50_000
    assert time.perf_counter() - began < 5.0
    assert len(lru) == 25_000
