"""JobRunner: runs memory jobs (spill, restore copies) on worker threads.

Rules:
- workers run only `Job.run()`, which touches the fds captured in the job, never the
  core; the loop learns of completions through a pipe its epoll watches and applies them
  with `core.memory.finish` on its own thread;
- a job is submitted once (`job.started`); many parked requests may wait for it;
- `shutdown()` waits for the jobs in flight, so no copy outlives the daemon's fds; except
  STREAM jobs (core/stream.py), which run on a daemon thread each, apart from the movers:
  one waits for a client to read its pipe (up to spill_read.STALL_S), and must neither
  hold up a spill nor the daemon's exit. They touch only their own dups of the spill
  files and their pipe;
- `call_soon(work)`: housekeeping whose outcome nobody waits for (closing an expired pooled
  memfd, backing/recycle.py) runs on a mover too, off the request loop; `shutdown()` waits
  for it as for jobs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..core.jobs import Job, JobKind
from ..fd import drain, pipe

__all__ = ["JobRunner"]

log = logging.getLogger("ugem.daemon")


class JobRunner:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ugem-mover")
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._r, self._w = pipe(os.O_NONBLOCK | os.O_CLOEXEC)  # workers -> loop: "a job is done"
        self.in_flight = 0

    def fileno(self) -> int:
        return self._r.fd

    def submit(self, job: Job) -> None:
        if job.started:
            return
        job.started = True
        self.in_flight += 1
        if job.kind is JobKind.STREAM:
            threading.Thread(target=self._work, args=(job,), name="ugem-stream", daemon=True).start()
        else:
            self._pool.submit(self._work, job)

    def call_soon(self, work: Callable[[], None]) -> None:
        """Run `work` on a mover thread, its outcome nobody's (housekeeping: closing an
        expired pooled memfd, backing/recycle.py); a failure is logged."""
        self._pool.submit(self._housekeep, work)

    @staticmethod
    def _housekeep(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("background housekeeping failed")

    def _work(self, job: Job) -> None:
        job.run()
        self._done.put(job)
        try:
            os.write(self._w.fd, b"j")
        except OSError:  # full of wakeups already (the loop drains the queue), or closed (a STREAM
            pass  # job ending after shutdown: nobody collects it)

    def completed(self) -> list[Job]:
        """Jobs finished since the last call (drains the wakeup pipe)."""
        drain(self._r)
        jobs = []
        while True:
            try:
                jobs.append(self._done.get_nowait())
            except queue.Empty:
                break
        self.in_flight -= len(jobs)
        return jobs

    def shutdown(self) -> list[Job]:
        """Wait for every job in flight; returns those not yet collected."""
        self._pool.shutdown(wait=True)
        jobs = self.completed()
        self._r.close()
        self._w.close()
        return jobs
