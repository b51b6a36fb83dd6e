"""The manager's own view of its objects: `list_objects()` rows (what `ugem ls` shows)."""

from __future__ import annotations

import ugem

PAGE = ugem.PAGE_SIZE
ROW_KEYS = {"id", "size", "placement", "madvise", "name", "handles", "owner_pid", "pinned", "mapped", "label"}


def _rows(dev):
    return {row["size"]: row for row in dev.list_objects()}


def test_rows_show_pins_and_mappings(make_env):
    env = make_env()
    dev, other = env.open(), env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"x")
    mapped = dev.create(2 * PAGE)
    row = _rows(dev)[PAGE]
    assert set(row) == ROW_KEYS
    assert (row["pinned"], row["mapped"], row["label"]) == (False, 0, None)
    dev.pin(h)
    views = [dev.mmap(mapped), dev.mmap(mapped)]
    rows = _rows(dev)
    assert (rows[PAGE]["pinned"], rows[PAGE]["mapped"]) == (True, 0)
    assert (rows[2 * PAGE]["pinned"], rows[2 * PAGE]["mapped"]) == (False, 2)
    # pinned by anyone: another client's pin shows too, and stays after this one unpins
    h2, _ = other.open_name(dev.flink(h))
    other.pin(h2)
    dev.unpin(h)
    assert _rows(dev)[PAGE]["pinned"] is True
    other.unpin(h2)
    assert _rows(dev)[PAGE]["pinned"] is False
    # a mapping keeps counting after the handle closes; released mappings stop counting
    dev.close_handle(mapped)
    assert _rows(dev)[2 * PAGE]["mapped"] == 2
    views.pop()
    assert _rows(dev)[2 * PAGE]["mapped"] == 1
    views.clear()
    assert 2 * PAGE not in _rows(dev)
