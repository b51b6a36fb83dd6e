"""The manager's own views of its objects and clients: `list_objects()` rows (what `ugem ls`
shows) and the per-client figures of `stats()` that `ugem top` ranks clients by."""

from __future__ import annotations

import numpy as np

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


def _resident(dev, client):
    [row] = [c for c in dev.stats()["per_client"] if c["id"] == client.client_id]
    return row["resident_bytes"]


def test_per_client_resident_bytes_count_the_objects_it_created(make_env):
    env = make_env()
    a, b = env.open(), env.open()
    assert _resident(a, a) == 0
    h = a.create(64 * PAGE)
    assert _resident(a, a) == 0  # no pages until first use
    a.pwrite(h, 0, b"\1" * (8 * PAGE))
    assert _resident(a, a) >= 8 * PAGE
    # another client's handle to it does not move the charge; its own object counts for it
    hb, _ = b.open_name(a.flink(h))
    b.pwrite(hb, 32 * PAGE, b"\2" * (8 * PAGE))
    own = b.create(4 * PAGE)
    b.pwrite(own, 0, b"\3" * (4 * PAGE))
    stats = a.stats()
    by_id = {c["id"]: c["resident_bytes"] for c in stats["per_client"]}
    assert by_id[a.client_id] >= 16 * PAGE and 4 * PAGE <= by_id[b.client_id] < 8 * PAGE
    assert sum(by_id.values()) == stats["resident_bytes"]
    # pages written through a mapping count once measured (stats measures)
    view = b.mmap(own)
    np.frombuffer(view, dtype=np.uint8)[:] = 4
    assert _resident(a, b) >= 4 * PAGE
    del view
    # closing gives it back; an object outliving its creator is nobody's
    b.close_handle(own)
    assert _resident(a, b) == 0
    a.close()
    stats = b.stats()
    assert [c["resident_bytes"] for c in stats["per_client"]] == [0]
    assert stats["resident_bytes"] >= 16 * PAGE
    b.close_handle(hb)
    assert b.stats()["resident_bytes"] == 0


def test_per_client_resident_bytes_follow_spills(make_env):
    env = make_env(system_budget=16 * PAGE)
    dev = env.open()
    handles = [dev.create(8 * PAGE) for _ in range(4)]
    for h in handles:
        dev.pwrite(h, 0, b"\5" * (8 * PAGE))
    stats = dev.stats()
    assert stats["spilled_bytes"] > 0
    [row] = stats["per_client"]
    assert row["resident_bytes"] == stats["resident_bytes"] <= 16 * PAGE
    for h in handles:
        assert dev.pread(h, 0, 8 * PAGE) == b"\5" * (8 * PAGE)
    stats = dev.stats()
    assert stats["per_client"][0]["resident_bytes"] == stats["resident_bytes"]
