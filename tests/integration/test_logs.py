"""`ugem serve --log-format json`: the daemon's log as JSON lines, and what it records (SPEC §4).

A real daemon logs client connects and disconnects, a client that died holding objects
(crash cleanup), quota refusals (throttled per client, nothing lost), protocol violations
and reclaim summaries; each line is one JSON object with time, level, event and, where a
client is involved, its client id, pid and uid. The text format stays as it was.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

import ugem
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import SAFETY_S, wait_until

MiB = 1 << 20
JSON = ("--log-format", "json")


def entries(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """Every line of the daemon's log, parsed: each must be a JSON object."""
    return [json.loads(line) for line in daemon.stderr_text().splitlines()]


def of(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in entries(daemon) if e["event"] == event]


HOLDER = """
import sys, ugem
dev = ugem.connect(sys.argv[1])
handles = [dev.create(1 << 20) for _ in range(3)]
dev.pwrite(handles[0], 0, b"x" * 4096)
view = dev.mmap(handles[1])
print(dev.client_id, flush=True)
sys.stdin.read()
"""


def test_json_lines_record_clients_and_crash_cleanup() -> None:
    with run_daemon(extra_args=JSON) as daemon:
        with daemon.connect() as dev:
            me = dev.client_id
            dev.close_handle(dev.create(4096))  # holds nothing when it closes
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, daemon.path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        crashed = int(holder.stdout.readline())
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
        wait_until(lambda: any(e["client"] == crashed for e in of(daemon, "client_disconnect")))
    log = entries(daemon)
    for e in log:
        assert {"time", "level", "event", "message"} <= set(e), e
        assert e["level"] in ("debug", "info", "warning", "error"), e
        assert datetime.datetime.fromisoformat(e["time"]).tzinfo is not None, e
    connects = {e["client"]: e for e in of(daemon, "client_connect")}
    assert connects[me]["pid"] == os.getpid() and connects[me]["uid"] == os.getuid()
    assert connects[crashed]["pid"] == holder.pid
    disconnects = {e["client"]: e for e in of(daemon, "client_disconnect")}
    assert disconnects[me]["reason"] == "closed" and disconnects[me]["pid"] == os.getpid()
    cleanups = {e["client"]: e for e in of(daemon, "client_cleanup")}
    assert me not in cleanups  # it had closed everything
    crash = cleanups[crashed]
    assert crash["exited"] is True and crash["pid"] == holder.pid and crash["uid"] == os.getuid()
    assert crash["handles"] == 3 and crash["mappings"] == 1, crash
    assert [e["event"] for e in log].index("shutdown") > [e["event"] for e in log].index("client_cleanup")


def test_quota_refusals_are_logged_throttled_and_counted() -> None:
    with run_daemon(client_quota="1M", extra_args=JSON) as daemon:
        with daemon.connect() as dev:
            for _ in range(10):
                with pytest.raises(ugem.QuotaExceeded):
                    dev.create(2 * MiB)
            me = dev.client_id
            wait_until(lambda: of(daemon, "quota_refused"))
    refusals = [e for e in of(daemon, "quota_refused") if e["client"] == me]
    assert 1 <= len(refusals) < 10, refusals  # throttled: not one line each
    first = refusals[0]
    assert first["op"] == "GEM_CREATE" and first["errno"] == "EDQUOT" and first["level"] == "warning"
    assert first["pid"] == os.getpid() and first["uid"] == os.getuid() and "quota" in first["message"]
    assert sum(e["count"] for e in refusals) == 10  # the lines held back are counted in the others


def test_protocol_violation_names_the_client() -> None:
    with run_daemon(extra_args=JSON) as daemon:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(daemon.path)
            raw.sendall(b"\xff" * 64)  # not a frame
            raw.settimeout(SAFETY_S)
            assert raw.recv(1) == b""  # dropped
        wait_until(lambda: of(daemon, "client_disconnect"))
    violation = of(daemon, "protocol_violation")[0]
    assert violation["pid"] == os.getpid() and violation["level"] == "warning"
    assert of(daemon, "client_disconnect")[0]["reason"] == "protocol_violation"


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ugem\[\d+\] (DEBUG|INFO|WARNING|ERROR) .+$")


def test_text_format_is_one_plain_line_per_record() -> None:
    with run_daemon() as daemon, daemon.connect() as dev:
        dev.create(4096)
    lines = daemon.stderr_text().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    assert any(line.endswith(f"connected: pid {os.getpid()} uid {os.getuid()}") for line in lines), lines
