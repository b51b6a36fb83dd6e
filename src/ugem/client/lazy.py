"""The lazy channel, the client's end: posts that need no prompt service, written without
waking the daemon (daemon/lazy.py has the daemon's rules).

Why: a Pool worker ends each unpickling by sending its claims (client/batch.py), one small
write that wakes the daemon, which then takes a CPU from the two processes doing the work:
on a 2-CPU machine a 1 MiB round trip to a worker cost 1.2-1.4x multiprocessing's
shared_memory with that write, and 0.96-1.17x with it left out (measured side by side). The
write cannot simply be held back: a worker ended (Pool.terminate) before it is sent would
leave the sender's share held for as long as the sender lives. Written to a socket the
daemon reads later, it is not lost when the worker dies: the daemon serves it when the
connection ends.

Rules:
- a daemon client opens it on first use (`SocketTransport.post_lazy`): a socketpair, the
  other end handed to the daemon with LAZY_CHANNEL (one round trip, once per connection).
  A daemon that refuses it (an older one: EINVAL) gets none, and everything goes on the
  connection as before;
- what goes on it: what `post_lazy` is given (the claims and share drops that end an
  unpickling), as POST frames numbered from the connection's own counter under its lock,
  so the daemon serves both channels in the order they were written;
- the daemon reads it before serving any frame of the connection, once a second, and when
  the connection ends: a lazy post is served no later than the client's next request, or
  about a second, or its end;
- a write never waits: at most MAX_WRITE bytes at once (one kernel buffer, so it goes whole
  or not at all), without blocking; one that does not fit (the daemon has not read the
  earlier ones yet) goes on the connection instead, which makes the daemon read all of the
  lazy ones first;
- closed with the transport; a forked child never writes to its parent's (its Device fails
  at once, client/fork.py).
"""

from __future__ import annotations

import socket

__all__ = ["MAX_WRITE", "LazyEnd"]

MAX_WRITE = 32768  # bytes: below the kernel's per-buffer size for a Unix stream socket (half its send buffer)


class LazyEnd:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.broken = False

    @staticmethod
    def pair() -> tuple[LazyEnd, socket.socket]:
        """A new channel: this end, and the socket to hand to the daemon."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return LazyEnd(mine), theirs

    def send(self, data: bytes | bytearray) -> bool:
        """Write `data` whole without waiting; False (nothing written) if it does not fit now."""
        if len(data) > MAX_WRITE:
            return False
        try:
            sent = self._sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # the daemon closed its end: the caller uses the connection, from now on
            self.broken = True
            return False
        if sent < len(data):  # not expected (one buffer): the rest must follow on this channel
            self._sock.sendall(memoryview(data)[sent:])
        return True

    def close(self) -> None:
        self._sock.close()
