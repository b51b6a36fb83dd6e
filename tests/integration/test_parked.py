"""A client parked in the daemon (waiting on a fence) that dies is released without the
fence ever completing: the daemon notices the hang-up while the request is parked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from ugem.testing import run_daemon
from ugem.testing.data import SAFETY_S

CHILD = textwrap.dedent("""
    import sys, ugem
    from ugem import cmd
    dev = ugem.connect(sys.argv[1])
    sem = dev.create(4096)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    target = dev.create(1 << 20)
    dev.execbuffer([cmd.SemaphoreWait(obj=sem, offset=0, value=1), cmd.Fill(dst=target, offset=0, length=16, byte=1)])
    print("parking", flush=True)
    dev.wait(target, -1)   # parked in the daemon until the semaphore is released: never
""")


def test_a_parked_client_that_dies_is_released() -> None:
    with run_daemon(hang_timeout=60) as daemon, daemon.connect() as observer:
        baseline_fds = daemon.fd_count()
        child = subprocess.Popen([sys.executable, "-c", CHILD, daemon.path], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"parking\n"
            time.sleep(0.3)  # let the wait reach the daemon and park
            assert observer.stats()["objects"] == 2
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        deadline = time.monotonic() + SAFETY_S  # the daemon checks parked clients once a second
        while time.monotonic() < deadline:
            stats = observer.stats()
            if stats["clients"] == 1 and stats["objects"] == 0:
                break
            time.sleep(0.1)
        assert (stats["clients"], stats["objects"]) == (1, 0), stats
        assert daemon.fd_count() <= baseline_fds
