import random

from hypothesis import given
from hypothesis import strategies as st

from ugem.core.ids import IdAllocator


def test_lowest_free_from_one():
    ids = IdAllocator()
    assert [ids.alloc() for _ in range(3)] == [1, 2, 3]
    ids.free(2)
    ids.free(1)
    assert ids.alloc() == 1
    assert ids.alloc() == 2
    assert ids.alloc() == 4
    assert len(ids) == 4


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=200))
def test_matches_a_set_model(ops):
    ids = IdAllocator()
    live: set[int] = set()
    for is_alloc, pick in ops:
        if is_alloc or not live:
            got = ids.alloc()
            expected = min(set(range(1, len(live) + 2)) - live)
            assert got == expected
            live.add(got)
        else:
            victim = sorted(live)[pick % len(live)]
            live.remove(victim)
            ids.free(victim)
        assert len(ids) == len(live)


def test_many_ids_stay_fast():
    ids = IdAllocator()
    taken = [ids.alloc() for _ in range(100_000)]
    rng = random.Random(1)
    rng.shuffle(taken)
    for ident in taken[:50_000]:
        ids.free(ident)
    assert ids.alloc() == min(taken[:50_000])
