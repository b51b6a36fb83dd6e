import pytest

from ugem.core.states import TRANSITIONS, Event, IllegalTransition, Placement, apply


def test_table_covers_every_state():
    assert set(TRANSITIONS) == set(Placement)


def test_final_states():
    assert TRANSITIONS[Placement.FREED] == {}
    assert set(TRANSITIONS[Placement.PURGED]) == {Event.FREE}


@pytest.mark.parametrize("state", list(Placement))
@pytest.mark.parametrize("event", list(Event))
def test_apply_follows_the_table(state, event):
    if event in TRANSITIONS[state]:
        assert apply(state, event) == TRANSITIONS[state][event]
    else:
        with pytest.raises(IllegalTransition):
            apply(state, event)


def test_labels_come_from_one_table():
    """info() and `ugem ls` name placements and advice from constants.py's tables, which the
    wire's numbers index (the client has no copy of its own)."""
    from ugem.constants import ADVICE_LABELS, ADVICE_PURGED, DONTNEED, PLACEMENT_LABELS, WILLNEED

    assert [p.label for p in Placement] == list(PLACEMENT_LABELS)
    assert (ADVICE_LABELS[WILLNEED], ADVICE_LABELS[DONTNEED], ADVICE_LABELS[ADVICE_PURGED]) == (
        "willneed", "dontneed", "purged")
