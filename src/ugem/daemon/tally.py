"""RequestTally: what the daemon's requests did, counted where their replies are made.

Every reply a connection sends (connection.py: `_reply`, `_reply_error`) is one `done()`
call: the op, the errno (0 for success) and the seconds since the request's frame was
complete (a request that waited for memory jobs counts its wait). Rules:
- counting is plain dict and list arithmetic on the loop's thread, well under a
  microsecond a request: the metrics endpoint (metrics.py) reads it at scrape time on the
  same thread, so nothing is locked and nothing is copied per request;
- latencies go into fixed buckets (`BUCKETS`, seconds) per op, as a Prometheus histogram
  wants them; errors are counted per (op, errno); op numbers that are not ops are all
  counted as one, `UNKNOWN` (named `unknown`);
- a quota refusal (EDQUOT) is also logged as event `quota_refused` with the client, op
  and errno, at most one line per client every `QUOTA_LOG_S` seconds; each line's `count`
  is the refusals it stands for (itself and those held back before it), and `expired()`
  logs the ones held back since once the client is quiet: the counts add up to all.
"""

from __future__ import annotations

import bisect
import errno
import logging
from typing import TYPE_CHECKING

from ..wire.frames import Op
from .logs import Throttle, event

if TYPE_CHECKING:
    from ..core.client import Client

__all__ = ["BUCKETS", "SECONDS", "RequestTally", "op_name"]

log = logging.getLogger("ugem.daemon")
_bucket = bisect.bisect_left
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUOTA_LOG_S = 5.0
UNKNOWN = -1  # every op number that is not an op is counted here, as one
_OPS = frozenset(int(op) for op in Op)


def op_name(op: int) -> str:
    """The op's name as `ugem ops` shows it (`GEM_CREATE`), or `unknown` for a number
    that is not an op (those are answered EINVAL)."""
    try:
        return Op(op).name
    except ValueError:
        return "unknown"


SECONDS = len(BUCKETS) + 1  # a row: a count per bucket, one above them all, then the sum of seconds


class RequestTally:
    def __init__(self) -> None:
        self.ops: dict[int, list[float]] = {}  # op -> row (SECONDS)
        self.errors: dict[tuple[int, int], int] = {}  # (op, errno) -> replies
        self.quota_lines = Throttle(QUOTA_LOG_S)

    def done(self, op: int, code: int, seconds: float) -> None:
        row = self.ops.get(op)
        if row is None:
            if op not in _OPS:  # a client's made-up numbers share one row: a bounded table
                op = UNKNOWN
            row = self.ops.get(op)
            if row is None:
                row = self.ops[op] = [0] * SECONDS + [0.0]
        row[_bucket(BUCKETS, seconds)] += 1
        row[SECONDS] += seconds
        if code:
            key = (op, code)
            self.errors[key] = self.errors.get(key, 0) + 1

    def refused(self, client: Client, op: int, message: str, now: float) -> None:
        """A request of `client` was refused EDQUOT: log it, throttled per client."""
        held = self.quota_lines.allow(client.id, now)
        if held is None:
            return
        more = f" ({held} more refused since the last line)" if held else ""
        event(log, logging.WARNING, "quota_refused", "client %d (pid %d uid %d): %s refused: %s%s", client.id,
              client.creds.pid, client.creds.uid, op_name(op), message, more, client=client.id,
              pid=client.creds.pid, uid=client.creds.uid, op=op_name(op), errno=errno.errorcode[errno.EDQUOT],
              count=held + 1)

    def expired(self, now: float) -> None:
        """Log the quota refusals held back from clients quiet for `QUOTA_LOG_S`."""
        for client_id, held in self.quota_lines.expired(now):
            event(log, logging.WARNING, "quota_refused", "client %s: %d more requests refused EDQUOT", client_id,
                  held, client=client_id, errno=errno.errorcode[errno.EDQUOT], count=held)
