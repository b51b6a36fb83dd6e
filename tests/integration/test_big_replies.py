"""Replies bigger than a frame over a real daemon (SPEC §5): `stats()` and `list_clients()`
with thousands of clients, `list_objects()` with tens of thousands of objects, all at once;
each arrives whole (in several frames, wire/frames.py), and nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import resource
from collections.abc import Iterator

import pytest

from ugem.wire.frames import MAX_PAYLOAD

CLIENTS = 15_000  # ~80 bytes of stats() each (~60 of list_clients()): past 1 MiB
OBJECTS = 20_000


@contextlib.contextmanager
def _fd_room(needed: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} fds, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed) if hard == resource.RLIM_INFINITY
                                                else max(soft, min(hard, needed)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stats_and_listings_of_thousands_of_clients_arrive_whole(daemon, kit):
    baseline = daemon.fd_count()
    with _fd_room(CLIENTS + 1000), daemon.connect() as dev, contextlib.ExitStack() as stack:
        handles = [dev.create(4096) for _ in range(OBJECTS)]
        others = [stack.enter_context(daemon.connect()) for _ in range(CLIENTS)]
        stats = dev.stats()
        assert len(json.dumps(stats)) > MAX_PAYLOAD
        assert stats["clients"] == CLIENTS + 1 and len(stats["per_client"]) == CLIENTS + 1
        assert {c["id"] for c in stats["per_client"]} == {d.client_id for d in [dev, *others]}
        clients = dev.list_clients()
        assert len(json.dumps(clients)) > MAX_PAYLOAD and len(clients) == CLIENTS + 1
        rows = dev.list_objects()
        assert len(json.dumps(rows)) > MAX_PAYLOAD and len(rows) == OBJECTS
        # every connection and object survived the big replies
        assert [d.info(h).size for d in (dev,) for h in (handles[0], handles[-1])] == [4096, 4096]
        assert dev.stats()["objects"] == OBJECTS
        assert others[-1].stats()["clients"] == CLIENTS + 1
    kit.assert_healthy(daemon, baseline)
