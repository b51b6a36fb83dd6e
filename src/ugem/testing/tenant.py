"""Tenant: a function run in a forked child as another user, with a channel back to the test.

Tests of per-user behaviour (names across uids, per-uid limits, socket permissions) need a
second uid. The child is forked, not exec'd (the interpreter may live where other users
cannot read), drops to the uid (gid the same, no supplementary groups) and runs
`fn(channel, *args)`; `channel` is a multiprocessing Connection. An exception in the child
comes back as an AssertionError of the test's next `recv`. Waits end on events (a message,
the child's exit through a pidfd); their timeouts are safety nets. Root only, for another uid.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..fd import OwnedFd
from .data import SAFETY_S

__all__ = ["NOBODY", "Tenant", "in_child"]

NOBODY = 65534


class Tenant:
    """`fn(channel, *args)` run in a child forked from this process, as `uid` (gid the same,
    no supplementary groups). `channel` is a multiprocessing Connection to the test: the
    child `send`s what it saw and may `recv` instructions; an exception in the child comes
    back as a failure of the test's next `recv`. Forked, not exec'd: the child can use
    only modules this process has already imported."""

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...], uid: int) -> None:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            ours.close()
            channel = Connection(theirs.detach())
            code = 1
            try:
                if uid != os.getuid():
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                fn(channel, *args)
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    channel.send({"child_error": traceback.format_exc()})
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.channel = Connection(ours.detach())
        self._pidfd = OwnedFd(os.pidfd_open(pid))
        self.status: int | None = None

    def recv(self, timeout: float = 2 * SAFETY_S) -> Any:
        """The child's next message; fails if it sends none within `timeout` (a safety net)."""
        if not self.channel.poll(timeout):
            raise AssertionError(f"child {self.pid} sent nothing within {timeout} s")
        try:
            message = self.channel.recv()
        except EOFError:
            raise AssertionError(f"child {self.pid} exited (status {self.join()}) without a message") from None
        if isinstance(message, dict) and "child_error" in message:
            raise AssertionError(f"child {self.pid} failed:\n{message['child_error']}")
        return message

    def send(self, message: Any) -> None:
        self.channel.send(message)

    def join(self, timeout: float = 2 * SAFETY_S) -> int:
        """The child's exit status once it exits (waited for as an event; `timeout` is a
        safety net, after which it is killed)."""
        if self.status is None:
            if not select.select([self._pidfd.fd], [], [], timeout)[0]:
                os.kill(self.pid, signal.SIGKILL)
            self.status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            self.join()
        self._pidfd.close()
        self.channel.close()


def _run_and_report(channel: Connection, fn: Callable[[], Any]) -> None:
    try:
        outcome: dict[str, Any] = {"ok": fn()}
    except BaseException as exc:  # reported to the parent, which asserts on it
        outcome = {"error": [type(exc).__name__, getattr(exc, "errno", None), str(exc)]}
    channel.send(outcome)


def in_child(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a child forked from this process (same uid) and return its outcome:
    `{"ok": result}`, or `{"error": [exception type name, errno or None, text]}`."""
    child = Tenant(_run_and_report, (fn,), os.getuid())
    try:
        outcome: dict[str, Any] = child.recv()
        assert child.join() == 0, f"child {child.pid} exited {child.status}"
        return outcome
    finally:
        child.close()
