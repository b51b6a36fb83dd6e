"""stats(): manager-wide figures and per-client rows (SPEC §2 stats, §3 "Resident system
memory is what those memfds really hold", §1 Device.close releases everything)."""

from __future__ import annotations

import os

import numpy as np

import ugem

PAGE = ugem.PAGE_SIZE

KEYS = {"objects", "clients", "resident_bytes", "vram_bytes", "spilled_bytes", "pinned_bytes",
        "purgeable_bytes", "purged_total", "evicted_total", "spilled_total", "bytes_moved_total"}
CLIENT_KEYS = {"id", "pid", "uid", "objects", "bytes", "pinned_bytes"}


def _row(stats, dev):
    [row] = [c for c in stats["per_client"] if c["id"] == dev.client_id]
    return row


def test_stats_has_every_figure(dev):
    stats = dev.stats()
    assert stats.keys() >= KEYS
    for key in KEYS:
        assert isinstance(stats[key], int) and stats[key] >= 0, key
    assert isinstance(stats["per_client"], list)
    row = _row(stats, dev)
    assert row.keys() >= CLIENT_KEYS


def test_fresh_manager_is_empty(make_env):
    env = make_env()
    dev = env.open()
    stats = dev.stats()
    assert stats["objects"] == 0
    assert stats["clients"] == 1
    assert stats["resident_bytes"] == 0
    assert stats["pinned_bytes"] == 0
    assert stats["purgeable_bytes"] == 0
    assert [c["id"] for c in stats["per_client"]] == [dev.client_id]


def test_object_and_client_counts(make_env):
    env = make_env()
    a, b = env.open(), env.open()
    assert a.stats()["clients"] == 2
    h = a.create(PAGE)
    a.create(2 * PAGE)
    assert a.stats()["objects"] == 2
    # more handles to the same object are not more objects
    b.open_name(a.flink(h))
    clone, _ = a.open_name(a.flink(h))
    assert b.stats()["objects"] == 2
    c = env.open()
    assert c.stats()["clients"] == 3
    c.close()
    a.close_handle(h)
    a.close_handle(clone)
    assert b.stats()["objects"] == 2  # b still holds it
    b.close()
    stats = a.stats()
    assert stats["clients"] == 1
    assert stats["objects"] == 1


def test_per_client_rows(make_env):
    env = make_env()
    a, b = env.open(), env.open()
    assert a.client_id != b.client_id
    ha = a.create(3 * PAGE)
    a.create(1)
    hb, _ = b.open_name(a.flink(ha))
    b.open_name(a.flink(ha))
    b.create(PAGE)
    stats = a.stats()
    assert {c["id"] for c in stats["per_client"]} == {a.client_id, b.client_id}
    ra, rb = _row(stats, a), _row(stats, b)
    assert (ra["pid"], ra["uid"]) == (os.getpid(), os.getuid())
    assert (rb["pid"], rb["uid"]) == (os.getpid(), os.getuid())
    assert (ra["objects"], ra["bytes"], ra["pinned_bytes"]) == (2, 4 * PAGE, 0)
    # b holds 3 handles but created only one page-sized object
    assert (rb["objects"], rb["bytes"], rb["pinned_bytes"]) == (3, PAGE, 0)
    b.close_handle(hb)
    assert _row(b.stats(), b)["objects"] == 2


def test_resident_bytes_follow_writes_and_close(make_env):
    dev = make_env().open()
    h = dev.create(64 * PAGE)
    assert dev.stats()["resident_bytes"] == 0  # no pages until first use
    dev.pread(h, 0, 64 * PAGE)
    assert dev.stats()["resident_bytes"] == 0  # reading a new object does not populate it
    dev.pwrite(h, 0, b"\x01" * (8 * PAGE))
    first = dev.stats()["resident_bytes"]
    assert first >= 8 * PAGE
    dev.pwrite(h, 32 * PAGE, b"\x02" * (16 * PAGE))
    second = dev.stats()["resident_bytes"]
    assert second >= first + 16 * PAGE
    h2 = dev.create(PAGE)
    dev.pwrite(h2, 0, b"x")
    assert dev.stats()["resident_bytes"] > second
    dev.close_handle(h)
    dev.close_handle(h2)
    assert dev.stats()["resident_bytes"] == 0


def test_resident_bytes_count_writes_through_mappings(make_env):
    dev = make_env().open()
    h = dev.create(32 * PAGE)
    view = dev.mmap(h)
    before = dev.stats()["resident_bytes"]
    np.frombuffer(view, dtype=np.uint8)[: 16 * PAGE] = 7
    assert dev.stats()["resident_bytes"] >= before + 16 * PAGE
    del view
    dev.close_handle(h)
    assert dev.stats()["resident_bytes"] == 0


def test_resident_bytes_stay_while_a_mapping_holds_the_object(make_env):
    dev = make_env().open()
    h = dev.create(4 * PAGE)
    dev.pwrite(h, 0, b"\x03" * (4 * PAGE))
    view = dev.mmap(h)
    dev.close_handle(h)
    stats = dev.stats()
    assert stats["objects"] == 1
    assert stats["resident_bytes"] >= 4 * PAGE
    del view
    stats = dev.stats()
    assert (stats["objects"], stats["resident_bytes"]) == (0, 0)


def test_device_close_releases_everything(make_env):
    env = make_env()
    observer, dev = env.open(), env.open()
    for i in range(5):
        h = dev.create((i + 1) * PAGE)
        dev.pwrite(h, 0, b"data")
    dev.flink(1)
    dev.mmap(2)  # a mapping dropped at once: its release is still pending in the client
    assert observer.stats()["objects"] == 5
    dev.close()
    stats = observer.stats()
    assert stats["objects"] == 0
    assert stats["clients"] == 1
    assert stats["resident_bytes"] == 0
    assert [c["id"] for c in stats["per_client"]] == [observer.client_id]


def test_device_close_keeps_objects_other_clients_hold(make_env):
    env = make_env()
    holder, dev = env.open(), env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"held")
    hh, _ = holder.open_name(dev.flink(h))
    dev.create(PAGE)
    dev.close()
    stats = holder.stats()
    assert stats["objects"] == 1
    assert holder.pread(hh, 0, 4) == b"held"
    # the creator is gone: its charge has no row any more
    assert [c["id"] for c in stats["per_client"]] == [holder.client_id]
