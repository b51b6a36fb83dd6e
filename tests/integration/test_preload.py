"""Preloaded, manager-owned objects: `ugem serve --object LABEL=PATH` and `lookup(label)`
(SPEC §4 "Service conventions", §2 `lookup`).

A real daemon loads each file into a read-only object it owns: the bytes of the file (holes
stay holes), a flink name any uid may open read-only, listed by `ugem ls` with its label and
the daemon as owner, counted in stats, never purged or spilled, alive across every client's
exit and a suspend/resume. The embedded Manager takes the same `object` key. A missing or
unsuitable file, a duplicate label or a bad LABEL=PATH is bad configuration (exit 2, one
line, nothing left behind).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

import ugem
from ugem.backing.preload import PROGRESS_FROM
from ugem.testing import in_child, run_daemon
from ugem.testing.data import random_bytes, wait_until

MIB = 1 << 20
PAGE = 4096
SAFETY = 120.0


@pytest.fixture
def files() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ugem-preload-") as directory:
        os.chmod(directory, 0o755)
        yield directory


def make_file(directory: str, name: str, data: bytes, *, sparse_size: int = 0) -> str:
    """A file holding `data` at its start (with `sparse_size`: then a hole, then `data`
    again, ending at that size)."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
        if sparse_size:
            f.seek(sparse_size - len(data))
            f.write(data)
    os.chmod(path, 0o644)
    return path


def objects(*pairs: tuple[str, str]) -> tuple[str, ...]:
    args: list[str] = []
    for label, path in pairs:
        args += ["--object", f"{label}={path}"]
    return tuple(args)


def _errno(call: Any, *args: Any, **kw: Any) -> int:
    try:
        call(*args, **kw)
    except ugem.UgemError as exc:
        return exc.errno or -1
    return 0


def _map_and_read(path: str, label: str) -> dict[str, Any]:
    """In another process: look the label up, map it read-only, return its bytes' facts."""
    with ugem.connect(path) as dev:
        handle, size = dev.open_name(dev.lookup(label))
        view = dev.mmap(handle, writable=False)
        data = bytes(view)
        view.release()
        return {"size": size, "data": data, "pid": os.getpid()}


def test_contents_equal_the_file_mapped_by_two_processes(files: str) -> None:
    data = random_bytes(7, 3 * MIB + 100)  # not a whole number of pages
    path = make_file(files, "weights.bin", data)
    with run_daemon(extra_args=objects(("weights", path))) as daemon:
        outcomes = [in_child(lambda: _map_and_read(daemon.path, "weights")) for _ in range(2)]
        for outcome in outcomes:
            got = outcome["ok"]
            assert got["size"] == 3 * MIB + PAGE  # rounded up to a page
            assert got["data"][:len(data)] == data
            assert got["data"][len(data):] == bytes(got["size"] - len(data))  # past the file: zeros
        assert outcomes[0]["ok"]["pid"] != outcomes[1]["ok"]["pid"]
        with daemon.connect() as dev:
            handle, _ = dev.open_name(dev.lookup("weights"))
            assert dev.pread(handle, 0, len(data)) == data
            info = dev.info(handle)
            assert info.readonly and info.placement == "system" and info.name == dev.lookup("weights")


def test_sparse_file_stays_sparse(files: str) -> None:
    chunk = random_bytes(3, 64 * 1024)
    path = make_file(files, "sparse.bin", chunk, sparse_size=1 << 30)
    with run_daemon(extra_args=objects(("sparse", path))) as daemon, daemon.connect() as dev:
        handle, size = dev.open_name(dev.lookup("sparse"))
        assert size == 1 << 30
        assert dev.pread(handle, 0, len(chunk)) == chunk
        assert dev.pread(handle, size - len(chunk), len(chunk)) == chunk
        assert dev.pread(handle, 512 * MIB, 4096) == bytes(4096)
        figures = dev.stats()
        assert figures["objects"] == 1
        assert 2 * len(chunk) <= figures["resident_bytes"] < 4 * MIB, figures  # a 1 GiB object holding 128 KiB


def _other_uid(channel: Connection, path: str, label: str) -> None:
    with ugem.connect(path) as dev:
        name = dev.lookup(label)
        handle, size = dev.open_name(name)
        info = dev.info(handle)
        view = dev.mmap(handle, writable=False)
        head = bytes(view[:16])
        view.release()
        channel.send({
            "uid": os.getuid(), "readonly": info.readonly, "head": head,
            "pwrite": _errno(dev.pwrite, handle, 0, b"x"),
            "mmap_writable": _errno(dev.mmap, handle),
            "export_writable": _errno(dev.export, handle),
            "create": _errno(dev.create, size),  # the preloaded bytes were charged to nobody
        })


def test_read_only_for_a_client_of_another_uid(files: str, kit: Any) -> None:
    data = random_bytes(11, 2 * MIB)
    path = make_file(files, "data.bin", data)
    with run_daemon(socket=os.path.join(kit.open_dir(), "ugem.sock"), socket_mode="0666",
                    uid_quota="3M", extra_args=objects(("data", path))) as daemon:
        tenant = kit.tenant(_other_uid, daemon.path, "data")
        seen = tenant.recv()
        assert seen["uid"] == kit.NOBODY and seen["readonly"] and seen["head"] == data[:16]
        assert seen["pwrite"] == errno.EINVAL
        assert seen["mmap_writable"] == errno.EACCES
        assert seen["export_writable"] == errno.EACCES
        assert seen["create"] == 0
        assert tenant.join() == 0
        with daemon.connect() as dev:  # the daemon's own uid (root here) gets a read-only handle too
            handle, _ = dev.open_name(dev.lookup("data"))
            assert _errno(dev.pwrite, handle, 0, b"x") == errno.EINVAL
            assert dev.pread(handle, 0, len(data)) == data


def test_survives_clients_and_budget_pressure_never_purged_or_spilled(files: str) -> None:
    data = random_bytes(5, 4 * MIB)
    path = make_file(files, "kept.bin", data)
    with run_daemon(system_budget="12M", extra_args=objects(("kept", path))) as daemon:
        for _ in range(2):  # clients come and go, one of them advising it away
            with daemon.connect() as dev:
                handle, _ = dev.open_name(dev.lookup("kept"))
                assert dev.madvise(handle, ugem.DONTNEED) is True
                assert dev.info(handle).madvise == "willneed"
        with daemon.connect() as dev:
            written = []
            for seed in range(4):  # 16 MiB more through a 12 MiB budget: others spill
                handle = dev.create(4 * MIB)
                dev.pwrite(handle, 0, random_bytes(seed, 4 * MIB))
                written.append(handle)
            figures = dev.stats()
            assert figures["spilled_total"] >= 1 and figures["purged_total"] == 0, figures
            handle, _ = dev.open_name(dev.lookup("kept"))
            assert dev.info(handle).placement == "system"
            dev.suspend()
            dev.resume()
            assert dev.pread(handle, 0, len(data)) == data
            rows = {r["label"]: r for r in dev.list_objects()}
            assert rows["kept"]["placement"] == "system"


def test_ls_lists_the_label_and_the_daemon_as_owner(files: str) -> None:
    path = make_file(files, "a.bin", b"a" * 5000)
    with run_daemon(extra_args=objects(("alpha", path))) as daemon:
        with daemon.connect() as dev:
            mine = dev.create(PAGE)
            result = subprocess.run([sys.executable, "-m", "ugem", "ls", "--json", "--socket", daemon.path],
                                    capture_output=True, text=True, timeout=SAFETY)
            assert result.returncode == 0, result.stderr
            rows = json.loads(result.stdout)
            (preloaded,) = [r for r in rows if r["label"] == "alpha"]
            assert preloaded["owner_pid"] == daemon.pid and preloaded["name"] == dev.lookup("alpha")
            assert preloaded["size"] == 2 * PAGE and preloaded["handles"] == 1
            assert [r["label"] for r in rows if r["label"] != "alpha"] == [None]
            text = subprocess.run([sys.executable, "-m", "ugem", "ls", "--socket", daemon.path],
                                  capture_output=True, text=True, timeout=SAFETY)
            assert "LABEL" in text.stdout.splitlines()[0] and "alpha" in text.stdout, text.stdout
            dev.close_handle(mine)
            assert dev.stats()["objects"] == 1


def test_lookup_of_an_unknown_label_is_enoent(files: str) -> None:
    path = make_file(files, "a.bin", b"a" * 10)
    with run_daemon(extra_args=objects(("alpha", path))) as daemon, daemon.connect() as dev:
        with pytest.raises(ugem.NoSuchObject, match="'beta'") as exc:
            dev.lookup("beta")
        assert exc.value.errno == errno.ENOENT
        assert _errno(dev.lookup, "") == errno.ENOENT
        assert _errno(dev.lookup, 5) == errno.EINVAL  # type: ignore[arg-type]
        assert dev.lookup("alpha") == 1


def test_large_file_logs_progress_and_lookup_waits_for_it(files: str) -> None:
    size = PROGRESS_FROM + 8 * MIB
    path = os.path.join(files, "big.bin")
    with open(path, "wb") as f:
        block = random_bytes(9, 8 * MIB)
        for _ in range(size // len(block)):
            f.write(block)
    small = make_file(files, "small.bin", b"s" * 100)
    with run_daemon(extra_args=objects(("big", path), ("small", small))) as daemon:
        with daemon.connect() as dev:  # serving at once; the lookup waits until "big" is loaded
            handle, got = dev.open_name(dev.lookup("big"))
            assert got == size
            assert dev.pread(handle, size - 8 * MIB, 4096) == block[:4096]
            assert dev.lookup("small") == 2
        log = wait_until(lambda: daemon.stderr_text() if "preloaded 'big'" in daemon.stderr_text() else None)
        progress = re.findall(r"preloading 'big': (\d+)% \(", log)
        assert len(progress) >= 2 and progress == sorted(progress, key=int), log  # tenths, in order
        assert "preloaded 'small'" in log, log


# -- the embedded manager --------------------------------------------------------------------

def test_embedded_manager_preloads_too(files: str) -> None:
    data = random_bytes(2, 100_000)
    path = make_file(files, "e.bin", data)
    with ugem.Manager(object=[f"e={path}"], spill_dir=os.path.join(files, "spill")) as manager:
        with manager.open() as first, manager.open() as second:
            handle, _ = second.open_name(first.lookup("e"))
            assert second.pread(handle, 0, len(data)) == data
            assert _errno(second.pwrite, handle, 0, b"x") == errno.EINVAL
            assert _errno(first.lookup, "f") == errno.ENOENT
            (row,) = first.list_objects()
            assert row["label"] == "e" and row["owner_pid"] == os.getpid()


@pytest.mark.parametrize("value", ["e=/nonexistent/file", "no-equals-sign", ["a=/etc/hostname", "a=/etc/hostname"]])
def test_embedded_manager_rejects_bad_objects(files: str, value: Any) -> None:
    with pytest.raises(ugem.InvalidArgument, match="object: "):
        ugem.Manager(object=value, spill_dir=os.path.join(files, "spill"))
    assert os.listdir(files) == []


# -- bad configuration -----------------------------------------------------------------------

def _bad_object_cases(directory: str) -> list[tuple[list[str], list[str]]]:
    good = make_file(directory, "good.bin", b"g" * 10)
    empty = make_file(directory, "empty.bin", b"")
    big = make_file(directory, "big.bin", b"b" * (256 * 1024))
    return [
        (["--object", f"w={directory}/missing.bin"], ["--object", "missing.bin", "No such file"]),
        (["--object", f"w={directory}"], ["--object", "a non-empty regular file"]),
        (["--object", f"w={empty}"], ["--object", "a non-empty regular file"]),
        (["--object", f"w={good}", "--object", f"w={good}"], ["--object", "given twice"]),
        (["--object", good], ["--object", "LABEL=PATH"]),
        (["--object", f"two words={good}"], ["--object", "LABEL=PATH"]),
        (["--object", f"w={big}", "--system-budget", "16K"], ["--object", "at most the system budget"]),
    ]


def test_bad_objects_exit_2_leaving_nothing(files: str) -> None:
    for args, named in _bad_object_cases(files):
        work = tempfile.mkdtemp(dir=files)
        result = subprocess.run([sys.executable, "-m", "ugem", "serve", "--socket", os.path.join(work, "s"),
                                 "--spill-dir", os.path.join(work, "spill"), *args],
                                capture_output=True, text=True, timeout=SAFETY)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        for text in named:
            assert text in lines[0], (text, lines[0])
        assert os.listdir(work) == [], (args, os.listdir(work))
