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
