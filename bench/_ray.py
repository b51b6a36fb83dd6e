"""Ray as a peer of a bench: one Ray session in its own process, driven line by line.

Ray is never a project dependency and the test suite never needs it: a bench that measures
Ray is given a Python that can `import ray` and `numpy` (`--ray-python PY`, else
$UGEM_BENCH_RAY_PYTHON, else the bench's own interpreter if it can), and lists its Ray rows
as skipped (with the reason) when there is none.

- `ray_python(ns)`: the Python to ask, from the bench's command line and environment;
- `ray_version(python)`: the Ray version `python` imports (with numpy), or None;
- `RayPeer(python, workdir, script, args)`: runs `python -c script *args` in its own session
  (so that everything Ray starts can be counted and, if need be, killed together). The
  script's protocol on stdout: `RAY {"ready": version}` once set up; then for every stdin
  line `CMD N`, one line `RAY {json}` with samples (ns) by label, or `{"error": "..."}`; the
  line `quit 0` makes it shut Ray down and exit. Its stderr goes to `workdir/ray-driver.log`,
  whose tail is quoted when it fails. `SERVE` is that loop, the end of every such script:
  the script defines `answer(cmd, n)` (the result dict of one command) before it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import _harness as H

RAY_ENABLE = "pass --ray-python PY (a Python with ray and numpy, e.g. a venv: python3 -m venv /tmp/rayenv && " \
             "/tmp/rayenv/bin/pip install ray numpy) or set $UGEM_BENCH_RAY_PYTHON"


SERVE = r"""
print("RAY " + json.dumps({"ready": ray.__version__}), flush=True)
for line in sys.stdin:
    cmd, n = line.split()
    if cmd == "quit":
        break
    try:
        result = answer(cmd, int(n))
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print("RAY " + json.dumps(result), flush=True)
ray.shutdown()
"""


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The --ray-python and --no-ray options every bench that measures Ray takes."""
    parser.add_argument("--ray-python", help="a Python that can import ray and numpy, to measure Ray (optional)")
    parser.add_argument("--no-ray", action="store_true", help="do not try to measure Ray")


def ray_python(ns: argparse.Namespace) -> str:
    """`--ray-python`, else $UGEM_BENCH_RAY_PYTHON, else this interpreter."""
    return getattr(ns, "ray_python", None) or os.environ.get("UGEM_BENCH_RAY_PYTHON") or sys.executable


def ray_env() -> dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0")


def ray_version(python: str) -> str | None:
    """The Ray version `python` can import (with numpy), or None."""
    try:
        r = subprocess.run([python, "-c", "import ray, numpy; print(ray.__version__)"], capture_output=True,
                           text=True, timeout=120, env=ray_env())
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


class RayPeer:
    """One Ray session in its own process, driven line by line over stdin/stdout."""

    def __init__(self, python: str, workdir: str, script: str, args: Sequence[str] = ()) -> None:
        self.errlog = os.path.join(workdir, "ray-driver.log")
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen([python, "-c", script, *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, start_new_session=True, env=ray_env())
        self.pending = b""
        try:
            self.version = str(self._reply(timeout=240)["ready"])
        except BaseException:
            self.close()
            raise

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = H.clock() + int(timeout * 1e9)
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                if line.startswith(b"RAY "):
                    result = dict(json.loads(line[4:]))
                    if "error" in result:
                        raise RuntimeError(f"Ray: {result['error']}")
                    return result
            left = (deadline - H.clock()) / 1e9
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from the Ray process in {timeout:g} s; {self._log_tail()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the Ray process exited ({self.proc.wait()}); {self._log_tail()}")
            self.pending += chunk

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError), open(self.errlog, errors="replace") as f:
            return "stderr: " + f.read()[-400:].strip()
        return ""

    def ask(self, cmd: str, n: int, *, timeout: float = 120) -> dict[str, list[int]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {n}\n".encode())
        self.proc.stdin.flush()
        return {k: [int(x) for x in v] for k, v in self._reply(timeout=timeout).items()}

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the processes of Ray's session (the driver, gcs_server,
        raylet, workers, agents: all started in the driver's own session)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # session id
                total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        return total / tick

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit 0\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the driver and what it started
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
