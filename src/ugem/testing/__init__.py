"""Test kit shipped with ugem (trio.testing): run a real daemon, open clients in both modes.

`run_daemon()` starts a real `ugem serve` subprocess on a temporary socket and stops it
with SIGTERM; `Env` opens clients of either an embedded Manager or a daemon, so one
conformance check can run against both.
"""

from .daemon import DaemonProcess, Env, run_daemon

__all__ = ["DaemonProcess", "Env", "run_daemon"]
