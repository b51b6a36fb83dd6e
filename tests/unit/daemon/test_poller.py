"""Poller (daemon/poller.py): epoll with one tag per fd, and the window its busy polling
gives a wait: COPY_SPIN while the client behind the last events holds an open bulk transfer
(its XFER_DONE follows its copy), DAEMON_SPIN otherwise. Real sockets and epoll; the window each
wait asked for is recorded from BusyPoll.check."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from ugem.daemon.poller import READ, Poller
from ugem.spin import COPY_SPIN, DAEMON_SPIN, SPIN, BusyPoll


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    asked: list[float] = []
    real = BusyPoll.check

    def check(self: BusyPoll, probe, window: float = SPIN):  # type: ignore[no-untyped-def]
        asked.append(window)
        return real(self, probe, window)
    monkeypatch.setattr(BusyPoll, "check", check)
    return asked


def test_a_wait_on_a_client_holding_a_transfer_gets_the_copy_window(windows: list[float]) -> None:
    client = SimpleNamespace(transfers={}, creds=SimpleNamespace(pid=None))
    poller = Poller(lambda tag: client if tag == "conn" else None)
    ours, theirs = socket.socketpair()
    try:
        poller.register(ours.fileno(), READ, "conn")
        theirs.send(b"request")
        assert poller.poll(1.0) == [(ours.fileno(), READ)]  # the last events: this client's
        ours.recv(16)
        theirs.send(b"next")
        poller.poll(1.0)
        client.transfers[1] = ("an object", 0, None)  # a bulk reply opened a transfer
        ours.recv(16)
        theirs.send(b"XFER_DONE")
        poller.poll(1.0)
        del client.transfers[1]
        ours.recv(16)
        theirs.send(b"next")
        poller.poll(1.0)
        assert windows == [DAEMON_SPIN, DAEMON_SPIN, COPY_SPIN, DAEMON_SPIN]
    finally:
        poller.close()
        ours.close()
        theirs.close()


def test_events_of_other_tags_get_the_daemons_plain_window(windows: list[float]) -> None:
    poller = Poller(lambda tag: None)  # the listener, signals, jobs: no client
    r, w = socket.socketpair()
    try:
        poller.register(r.fileno(), READ, "listener")
        w.send(b"x")
        poller.poll(1.0)
        r.recv(1)
        w.send(b"x")
        poller.poll(1.0)
        assert windows == [DAEMON_SPIN, DAEMON_SPIN]
    finally:
        poller.close()
        r.close()
        w.close()
