"""`ugem top` against a real daemon (SPEC §4: live view of regions and clients).

`--once` prints one frame whose figures match the daemon's `stats()` (system against the
budget, VRAM against its size, spilled, pinned, purgeable, this client's row with its resident
memory, size and pins); the live mode,
run under a pseudo-terminal with a short interval, redraws with rates from a second sample and
exits 0 on SIGINT, restoring the cursor; usage and no-daemon errors have their exit codes.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from ugem.cmd import Fill
from ugem.testing import run_daemon
from ugem.testing.data import SAFETY_S

UGEM = [sys.executable, "-m", "ugem"]
KiB = 1 << 10
REGIONS = ("objects", "resident_bytes", "vram_bytes", "spilled_bytes", "pinned_bytes", "purgeable_bytes",
           "spilled_total", "per_client")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra)
    return env


def human(n: int) -> str:
    """Binary units as top shows them, written out again here."""
    if n < 1024:
        return f"{n} B"
    value, unit = next((n / 1024**k, u) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k)
    return f"{value:.1f} {unit}"


def _line(text: str, label: str) -> str:
    lines = [line for line in text.splitlines() if re.match(rf"^│ {label}\b", line)]
    assert len(lines) == 1, f"{label!r} in:\n{text}"
    return lines[0]


def test_once_prints_one_frame_with_the_daemons_figures() -> None:
    with run_daemon(system_budget="64K", vram="1M") as daemon, daemon.connect() as dev:
        handles = [dev.create(16 * KiB) for _ in range(6)]
        for h in handles:  # 96 KiB written under a 64 KiB budget: the oldest spill
            dev.pwrite(h, 0, b"x" * 16 * KiB)
        vram = dev.create(8 * KiB)
        dev.execbuffer([Fill(dst=vram, offset=0, length=4096, byte=1)])
        dev.wait(vram, -1)
        pinned = dev.create(8 * KiB)
        dev.pwrite(pinned, 0, b"p")
        dev.pin(pinned)
        for _ in range(50):  # background work (spills, hole punching) may still change the figures
            stats = dev.stats()
            out = subprocess.run([*UGEM, "top", "--socket", daemon.path, "--once"], capture_output=True,
                                 text=True, timeout=30, env=_env(COLUMNS="100"))
            after = dev.stats()
            if all(after[key] == stats[key] for key in REGIONS):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the figures never settled: {stats} / {after}")
        assert stats["spilled_bytes"] > 0 and stats["vram_bytes"] > 0 and stats["pinned_bytes"] == 8 * KiB
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    text = out.stdout
    assert all(len(line) <= 100 for line in text.splitlines())
    assert text.count("ugem top") == 1
    assert text.startswith(f"ugem top  {stats['objects']} objects, 2 clients  device: running  rates: first sample")
    system = _line(text, "system")
    assert f"{human(stats['resident_bytes'])} / 64.0 KiB" in system
    assert f"{100 * stats['resident_bytes'] / (64 * KiB):.1f}%" in system
    assert f"{human(stats['vram_bytes'])} / 1.0 MiB" in _line(text, "VRAM")
    assert human(stats["spilled_bytes"]) in _line(text, "spilled")
    assert "8.0 KiB" in _line(text, "pinned")
    assert "0 B" in _line(text, "purgeable")
    assert f"spills             -   {stats['spilled_total']:>8}" in text
    me = next(c for c in stats["per_client"] if c["pid"] == os.getpid())
    assert (me["objects"], me["bytes"], me["pinned_bytes"]) == (8, 112 * KiB, 8 * KiB)
    # resident: what this client's objects hold in system memory (the spilled ones nothing)
    assert me["resident_bytes"] == stats["resident_bytes"] < me["bytes"]
    mine = [line.split() for line in text.splitlines() if re.match(rf"^\s*\d+\s+{os.getpid()}\s", line)]
    assert mine == [[str(me["id"]), str(os.getpid()), str(os.getuid()), "8", *human(me["resident_bytes"]).split(),
                     "112.0", "KiB", "8.0", "KiB"]]


def test_live_mode_redraws_and_exits_0_on_sigint() -> None:
    with run_daemon() as daemon, daemon.connect() as dev:
        dev.create(4096)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        try:
            proc = subprocess.Popen([*UGEM, "top", "--socket", daemon.path, "--interval", "0.2"], stdin=slave,
                                    stdout=slave, stderr=slave, env=_env(TERM="xterm"), start_new_session=True)
        finally:
            os.close(slave)
        output = b""

        def drain(seconds: float) -> None:
            nonlocal output
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                if select.select([master], [], [], min(left, 0.1))[0]:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO: the child closed the terminal
                        return
                    if not chunk:
                        return
                    output += chunk

        try:
            deadline = time.monotonic() + SAFETY_S
            while b"rates over" not in output and time.monotonic() < deadline and proc.poll() is None:
                drain(0.1)
            drain(0.5)  # a couple more frames
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + SAFETY_S
            while proc.poll() is None and time.monotonic() < deadline:
                drain(0.1)  # read on: a full terminal would block its last redraw, and its exit
            status = proc.wait(timeout=1)
            drain(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
    text = output.decode(errors="replace")
    assert status == 0, text
    assert "rates: first sample" in text and re.search(r"rates over \d+\.\d s", text), text
    assert text.count("ugem top") >= 2
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.rstrip().endswith("\x1b[?25h"), repr(text[-200:])  # the cursor is shown again


def test_usage_and_missing_daemon() -> None:
    bad = subprocess.run([*UGEM, "top", "--interval", "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "positive" in bad.stderr
    gone = subprocess.run([*UGEM, "top", "--socket", "/nonexistent/ugem.sock", "--once"], capture_output=True,
                          text=True, timeout=30)
    assert gone.returncode == 3 and "Traceback" not in gone.stderr
