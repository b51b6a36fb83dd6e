"""A client's connection to a real daemon when things go wrong (SPEC §1, §2): the daemon dies
during a call, stops answering (SIGSTOP), or cannot be reached; what the caller sees each time.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

import ugem
from ugem.cmd import SemaphoreWait
from ugem.testing import run_daemon

PAGE = 4096


def test_after_the_daemon_dies_mid_call_every_later_call_is_daemon_gone(tmp_path):
    with run_daemon(spill_dir=str(tmp_path), hang_timeout=600) as daemon:
        dev = daemon.connect()
        sem = dev.create(PAGE)
        dev.set_caching(sem, ugem.CACHING_CACHED)
        fence = dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])  # never released
        outcome: list[BaseException] = []
        sending = threading.Event()

        def call() -> None:
            sending.set()
            try:
                dev.wait_fence(fence, -1)  # read and parked by the daemon: it then dies
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        sending.wait()
        time.sleep(0.5)  # (had the daemon not read it yet, the reset fails it the same way)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(60)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], ugem.DaemonGone), outcome
        for later in (lambda: dev.info(sem), dev.stats, lambda: dev.create(PAGE)):
            with pytest.raises(ugem.DaemonGone) as exc:
                later()
            assert exc.value.errno != errno.EBADF
        dev.close()
