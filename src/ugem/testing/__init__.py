"""Test kit shipped with ugem (trio.testing): run a real daemon, open clients in both modes.

`run_daemon()` starts a real `ugem serve` subprocess on a temporary socket and stops it
with SIGTERM; `Env` opens clients of either an embedded Manager or a daemon, so one
conformance check can run against both. `FakeGpu` is a deterministic GpuBackend for
core tests: ops run on submit unless it is paused. `Tenant` runs a function in a child
forked as another uid, with a channel back to the test.
"""

from .daemon import DaemonProcess, Env, run_daemon
from .fake_gpu import FakeGpu
from .tenant import NOBODY, Tenant, in_child

__all__ = ["NOBODY", "DaemonProcess", "Env", "FakeGpu", "Tenant", "in_child", "run_daemon"]
