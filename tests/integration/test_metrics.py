"""`ugem serve --metrics ADDR`: Prometheus exposition scraped from a live daemon (SPEC §4).

Scrapes go over real HTTP (TCP, and a Unix socket) and are parsed with
prometheus_client.parser; the figures must move with a workload: objects, handles, names,
resident and spilled bytes, the purge/spill/restore counters, requests by op, errors by
op and errno, and the latency histogram.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ugem
from ugem.testing import DaemonProcess, run_daemon
from ugem.testing.data import SAFETY_S, wait_until

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _events(daemon: DaemonProcess, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in daemon.stderr_text().splitlines() if line.startswith("{")]
    return [entry for entry in lines if entry["event"] == name]


def _address(daemon: DaemonProcess) -> str:
    """Where the daemon serves metrics (port 0 picked one; the log says which)."""
    wait_until(lambda: _events(daemon, "metrics_listening"), what="the metrics_listening log line")
    return str(_events(daemon, "metrics_listening")[0]["address"])


def _parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_tcp(address: str, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=SAFETY_S) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return _parse(response.read().decode())


def http_unix(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SAFETY_S)
        sock.connect(path)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served() -> Iterator[tuple[DaemonProcess, str]]:
    with run_daemon(client_quota="8M", extra_args=("--metrics", "127.0.0.1:0", "--log-format", "json")) as daemon:
        yield daemon, _address(daemon)


def test_figures_and_counters_move_with_a_workload(served: tuple[DaemonProcess, str]) -> None:
    daemon, address = served
    before = scrape_tcp(address)
    assert value(before, "ugem_objects") == 0 and value(before, "ugem_clients") == 0
    for name in ("ugem_resident_bytes", "ugem_spilled_bytes", "ugem_vram_bytes", "ugem_pinned_bytes",
                 "ugem_purgeable_bytes", "ugem_purged_total", "ugem_spilled_total", "ugem_evicted_total",
                 "ugem_bytes_moved_total", "ugem_handles", "ugem_names", "ugem_memfds", "ugem_memfd_limit",
                 "ugem_restored_total", "process_open_fds"):
        assert (name, ()) in before, name
    with daemon.connect() as dev:
        handles = [dev.create(MiB) for _ in range(3)]
        for h in handles:
            dev.pwrite(h, 0, b"m" * MiB)
        dev.flink(handles[0])
        dev.close_handle(handles[2])
        with pytest.raises(ugem.UgemError):
            dev.close_handle(999)  # EINVAL
        with pytest.raises(ugem.UgemError):
            dev.create(16 * MiB)  # EDQUOT: past --client-quota 8M
        dontneed = dev.create(MiB)
        dev.madvise(dontneed, ugem.DONTNEED)  # no pages yet: purged at once
        after = scrape_tcp(address)
        assert value(after, "ugem_clients") == 1
        assert value(after, "ugem_objects") == 3 and value(after, "ugem_handles") == 3
        assert value(after, "ugem_names") == 1
        assert value(after, "ugem_resident_bytes") == 2 * MiB
        assert value(after, "ugem_memfds") == 2
        assert value(after, "ugem_purged_total") == 1
    create = value(after, "ugem_requests_total", op="GEM_CREATE") - value(before, "ugem_requests_total",
                                                                         op="GEM_CREATE")
    assert create == 5
    assert value(after, "ugem_requests_total", op="GEM_PWRITE") >= 3
    assert value(after, "ugem_errors_total", op="GEM_CLOSE", errno="EINVAL") == 1
    assert value(after, "ugem_errors_total", op="GEM_CREATE", errno="EDQUOT") == 1
    assert value(after, "ugem_request_duration_seconds_count", op="GEM_CREATE") == \
        value(after, "ugem_requests_total", op="GEM_CREATE")
    assert value(after, "ugem_request_duration_seconds_bucket", op="GEM_CREATE", le="+Inf") == \
        value(after, "ugem_request_duration_seconds_count", op="GEM_CREATE")
    assert value(after, "ugem_request_duration_seconds_sum", op="GEM_CREATE") > 0
    gone = scrape_tcp(address)  # the client went away: its objects with it
    assert value(gone, "ugem_objects") == 0 and value(gone, "ugem_clients") == 0


def test_spill_and_restore_counters() -> None:
    with run_daemon(system_budget="4M", extra_args=("--metrics", "127.0.0.1:0", "--log-format", "json")) as daemon:
        address = _address(daemon)
        with daemon.connect() as dev:
            handles = [dev.create(MiB) for _ in range(8)]
            for i, h in enumerate(handles):
                dev.pwrite(h, 0, bytes([i]) * MiB)
            spilled = scrape_tcp(address)
            assert value(spilled, "ugem_spilled_total") >= 4
            assert value(spilled, "ugem_spilled_bytes") >= 4 * MiB
            assert value(spilled, "ugem_resident_bytes") <= 4 * MiB
            assert dev.pread(handles[0], 0, MiB) == bytes([0]) * MiB  # back from disk
            restored = scrape_tcp(address)
    assert value(restored, "ugem_restored_total") >= 1
    assert value(restored, "ugem_bytes_moved_total") >= value(spilled, "ugem_bytes_moved_total") + MiB
    reclaim = _events(daemon, "reclaim")  # summed up in the log too, at the latest as it stops
    assert sum(int(str(e["spilled"])) for e in reclaim) == value(restored, "ugem_spilled_total"), reclaim
    assert sum(int(str(e["restored"])) for e in reclaim) == value(restored, "ugem_restored_total"), reclaim


def test_metrics_on_a_unix_socket_and_other_paths() -> None:
    with tempfile.TemporaryDirectory(prefix="ugem-m-") as directory:  # short: AF_UNIX paths are
        path = os.path.join(directory, "metrics.sock")
        with run_daemon(extra_args=("--metrics", path)) as daemon:
            assert os.path.exists(path)  # bound before the daemon announced itself
            with daemon.connect() as dev:
                dev.create(4096)
                reply = http_unix(path, b"GET /metrics HTTP/1.1\r\nHost: ugem\r\n\r\n")
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK"), head
            samples = _parse(body.decode())
            assert value(samples, "ugem_objects") == 1 and value(samples, "ugem_requests_total", op="HELLO") == 1
            assert http_unix(path, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
            assert http_unix(path, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
            head_only = http_unix(path, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head_only.startswith(b"HTTP/1.1 200") and head_only.endswith(b"\r\n\r\n")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:  # a scraper that says nothing
                silent.connect(path)
                with daemon.connect() as dev:  # blocks nobody
                    assert dev.stats()["clients"] == 1
        assert not os.path.exists(path)  # removed at exit


def test_openmetrics_is_served_when_asked_for(served: tuple[DaemonProcess, str]) -> None:
    _, address = served
    request = urllib.request.Request(f"http://{address}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=SAFETY_S) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().rstrip().endswith(b"# EOF")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{address}/", timeout=SAFETY_S)
    assert info.value.code == 404
    info.value.close()


def _serve(tmp: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ugem", "serve", "--socket", os.path.join(tmp, "s"),
                           "--spill-dir", os.path.join(tmp, "spill"), *args], capture_output=True, text=True,
                          timeout=SAFETY_S)


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:http", "127.0.0.1:70000", "no-such-host.invalid:9464",
                                     "/no/such/dir/metrics.sock", "in-use"])
def test_a_bad_metrics_address_is_bad_configuration(tmp_path: object, address: str) -> None:
    tmp = str(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if address == "in-use":
            address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = _serve(tmp, "--metrics", address)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ugem: --metrics: {address!r}"), result.stderr
    assert os.listdir(tmp) == []  # no socket, no lock, no spill directory


def test_a_bad_log_format_is_bad_configuration(tmp_path: object) -> None:
    result = _serve(str(tmp_path), "--log-format", "xml")
    assert result.returncode == 2 and result.stderr == "ugem: --log-format: 'xml' is not one of text, json\n"


def test_unknown_ops_are_counted_as_one(served: tuple[DaemonProcess, str], kit: Any) -> None:
    daemon, address = served
    with kit.raw(daemon.path) as raw:
        raw.hello()
        for op in (99, 0x7FFF, 0xFFFF):
            raw.frame(op, b"")
            assert raw.reply().status == errno.EINVAL
    samples = scrape_tcp(address)
    assert value(samples, "ugem_requests_total", op="unknown") == 3
    assert value(samples, "ugem_errors_total", op="unknown", errno="EINVAL") == 3
    assert [key for key in samples if key[0] == "ugem_requests_total" and ("op", "unknown") in key[1]] == \
        [("ugem_requests_total", (("op", "unknown"),))]


def test_silent_scrapers_cannot_take_the_daemons_fds(served: tuple[DaemonProcess, str]) -> None:
    daemon, address = served
    host, port = address.rsplit(":", 1)
    baseline = daemon.fd_count()
    silent = [socket.create_connection((host, int(port)), timeout=SAFETY_S) for _ in range(8)]
    try:
        wait_until(lambda: daemon.fd_count() == baseline + 8)  # all eight accepted and held
        with socket.create_connection((host, int(port)), timeout=SAFETY_S) as ninth:
            assert ninth.recv(1) == b""  # closed at accept: too many open
        with daemon.connect() as dev:  # clients are served meanwhile
            assert dev.stats()["clients"] == 1
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: daemon.fd_count() == baseline)
    assert value(scrape_tcp(address), "ugem_clients") == 0
