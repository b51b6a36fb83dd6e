"""ugem.dask's object pool (src/ugem/dask/pool.py): the objects of deleted keys are reused
for new values of about their size, never while anything else can see them, never showing
what they held before, bounded, DONTNEED while pooled, and released at close."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("distributed")

from ugem.client.buffer import Buffer  # noqa: E402
from ugem.dask import UgemBuffer  # noqa: E402
from ugem.testing import DaemonProcess, run_daemon  # noqa: E402

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def data(daemon: DaemonProcess) -> Iterator[UgemBuffer]:
    buffer = UgemBuffer(daemon.path, target="4M", min_size="64K")  # pool: 4 MiB too
    yield buffer
    buffer.close()


def _stored_and_deleted(data: UgemBuffer, key: str, value: np.ndarray) -> None:
    data[key] = value
    data.flush()
    del data[key]
    data.flush()  # the writer thread asked the daemon and pooled it (or closed it)


def test_a_deleted_value_s_object_stores_the_next_value_of_its_size(data: UgemBuffer, daemon: DaemonProcess) -> None:
    with daemon.connect() as dev:
        _stored_and_deleted(data, "a", np.full(MiB // 8, 1.0))
        assert data.pool.counts["admitted"] == 1 and data.pool.bytes == MiB
        stats = dev.stats()
        assert stats["objects"] == 1 and stats["purgeable_bytes"] == MiB  # DONTNEED while pooled
        data["b"] = np.full(MiB // 8, 2.0)
        data.flush()
        assert data.pool.counts["reused"] == 1 and data.pool.bytes == 0
        stats = dev.stats()
        assert stats["objects"] == 1 and stats["purgeable_bytes"] == 0  # no new object; WILLNEED again
        np.testing.assert_array_equal(data["b"], np.full(MiB // 8, 2.0))


def test_a_reused_object_never_shows_what_it_held(data: UgemBuffer) -> None:
    _stored_and_deleted(data, "big", np.full(MiB + 3 * PAGE, 0xAB, dtype=np.uint8))
    small = np.full(MiB + 100, 0x11, dtype=np.uint8)  # rounded up to a page: within an eighth of it
    data["small"] = small
    data.flush()
    assert data.pool.counts["reused"] == 1
    stored = data._stored["small"]
    whole = stored.buf.read(0, stored.buf.size)  # every byte of the object, past the value too
    assert whole[:len(small)] == small.tobytes() and whole[len(small):] == bytes(len(whole) - len(small))
    np.testing.assert_array_equal(data["small"], small)


def test_an_object_anything_else_refers_to_is_not_pooled(data: UgemBuffer, daemon: DaemonProcess) -> None:
    value = np.full(MiB // 8, 3.0)
    data["held"] = value  # a view of it still in use here: not even offered to the pool
    data.flush()
    view = data["held"]
    del data["held"]
    data.flush()
    assert data.pool.counts == {"admitted": 0, "refused": 0, "reused": 0, "purged": 0}
    del view

    data["sliced"] = value  # a slice a task returned: a second handle to the same object
    data.flush()
    data["slice"] = data["sliced"][:1000]  # type: ignore[index]
    del data["sliced"]
    del data["slice"]  # adopted, not made by this buffer: closed
    data.flush()
    assert data.pool.counts["admitted"] == 0 and data.pool.bytes == 0

    with daemon.connect() as other:  # another client mapped it, as a worker the value was sent to
        data["shared"] = value
        data.flush()
        name = data._stored["shared"].buf.flink()
        theirs = Buffer.open_name(other, name)
        mapping = theirs.array(np.float64)
        theirs.close()
        del data["shared"]
        data.flush()
        assert data.pool.counts["refused"] == 1 and data.pool.bytes == 0
        assert float(mapping[0]) == 3.0  # what they see stays theirs
        del mapping
        data.pool.clear()
        assert other.stats()["objects"] == 0


def test_the_pool_is_bounded_and_released_at_close(daemon: DaemonProcess) -> None:
    data = UgemBuffer(daemon.path, target="4M", pool="2M")
    with daemon.connect() as dev:
        baseline = daemon.fd_count()
        for i in range(3):
            data[i] = np.full(MiB // 8, float(i))
        data.flush()
        for i in range(3):
            del data[i]
        data.flush()
        assert data.pool.counts["admitted"] == 3 and data.pool.bytes == 2 * MiB  # the oldest let go
        assert dev.stats()["objects"] == 2
        data["too big"] = np.ones(3 * MiB // 8)  # bigger than anything pooled: a new object
        data.flush()
        del data["too big"]
        data.flush()
        assert data.pool.counts["refused"] == 1 and dev.stats()["objects"] == 2  # over the bound: closed
        data.close()
        assert dev.stats()["objects"] == 0 and dev.stats()["clients"] == 1
        assert daemon.fd_count() <= baseline


def test_a_pooled_object_the_daemon_purged_is_replaced() -> None:
    with run_daemon(system_budget="8M") as daemon, daemon.connect() as dev:
        data = UgemBuffer(daemon.path, target="4M")
        try:
            _stored_and_deleted(data, "a", np.full(MiB // 8, 1.0))
            assert data.pool.bytes == MiB
            other = dev.new(8 * MiB)
            other.write(b"\x01" * (8 * MiB))  # the whole budget: the pooled (DONTNEED) object is purged first
            assert dev.stats()["purged_total"] == 1
            other.close()
            data["b"] = np.full(MiB // 8, 2.0)
            data.flush()
            assert data.pool.counts["purged"] == 1 and data.pool.counts["reused"] == 0
            np.testing.assert_array_equal(data["b"], np.full(MiB // 8, 2.0))
        finally:
            data.close()
