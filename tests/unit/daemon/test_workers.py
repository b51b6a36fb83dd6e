"""JobRunner (daemon/workers.py): housekeeping handed to `call_soon` runs on a mover thread,
not the caller's; a failure is logged and the movers go on; `shutdown` waits for it."""

from __future__ import annotations

import logging
import threading

import pytest

from ugem.daemon.workers import JobRunner


def test_call_soon_runs_on_a_mover_and_shutdown_waits_for_it(caplog: pytest.LogCaptureFixture) -> None:
    runner = JobRunner()
    ran: list[str] = []
    release = threading.Event()

    def fails() -> None:
        raise OSError(9, "bad fd")

    def work() -> None:
        assert release.wait(60), "never released"
        ran.append(threading.current_thread().name)
    with caplog.at_level(logging.ERROR, logger="ugem.daemon"):
        runner.call_soon(fails)
        runner.call_soon(work)
        assert ran == []  # not on this thread
        release.set()
        assert runner.shutdown() == []
    assert len(ran) == 1 and ran[0].startswith("ugem-mover")
    assert "background housekeeping failed" in caplog.text
