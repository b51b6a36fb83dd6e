"""suspend / resume (SPEC §2 suspend, resume, stats; §3 "suspend"; §5 privileges;
gem-reference §4.7 suspend, §5.10 IGT gem_exec_suspend basic-S3 / cached-S3 / uncached-S3).

Every test gets a manager of its own (make_env): a suspended device must never leak into
another test. Objects are made dirty in VRAM with device fills (the VRAM copy is then the
only up-to-date one), so reading them back after suspend proves they were saved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

import ugem
from ugem.cmd import Copy, Fill, SemaphoreWait
from ugem.testing import run_daemon
from ugem.testing.data import wait_until

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
NOBODY = 65534


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def _dirty_in_vram(dev, size: int, seed: int) -> tuple[int, bytes]:
    """An object with data whose newest bytes live only in VRAM."""
    h = dev.create(size)
    data = bytearray(_data(seed, size))
    dev.pwrite(h, 0, bytes(data))
    off = (seed * 4099) % (size - 64)
    dev.execbuffer([Fill(dst=h, offset=off, length=64, byte=seed & 0xFF)])
    data[off:off + 64] = bytes([seed & 0xFF]) * 64
    return h, bytes(data)


def _only_in_vram(dev, size: int, byte: int) -> tuple[int, bytes]:
    """An object that never had system pages: its contents exist only in VRAM."""
    h = dev.create(size)
    dev.execbuffer([Fill(dst=h, offset=0, length=size, byte=byte), Fill(dst=h, offset=byte, length=3, byte=0xFF)])
    return h, bytes([byte]) * byte + b"\xff" * 3 + bytes([byte]) * (size - byte - 3)


def _in_thread(fn, *args):
    """Run fn(*args) in a thread; returns (thread, result list receiving (value or exc, elapsed))."""
    out: list = []

    def run():
        start = time.monotonic()
        try:
            out.append((fn(*args), time.monotonic() - start))
        except ugem.UgemError as exc:
            out.append((exc, time.monotonic() - start))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- privileges ------------------------------------------------------------------------


def test_unprivileged_client_gets_eacces(make_env, mode, as_user):
    if mode == "embedded":
        pytest.skip("every client of an embedded manager is this process, the manager's own uid")
    env = make_env(socket_mode="0666")
    os.chmod(env.daemon.directory, 0o755)
    dev = env.open()
    h, data = _dirty_in_vram(dev, PAGE, seed=1)
    path = env.daemon.path

    def attempt() -> list:
        codes = []
        with ugem.connect(path) as d:
            for call in (d.suspend, d.resume):
                try:
                    call()
                    codes.append(0)
                except ugem.UgemError as exc:
                    codes.append(exc.errno)
        return codes

    with as_user(NOBODY, attempt) as codes:
        assert codes == [errno.EACCES, errno.EACCES]
    assert dev.stats()["vram_bytes"] > 0  # nothing was saved
    assert dev.info(h).placement == "vram"
    dev.execbuffer([Fill(dst=h, offset=0, length=1, byte=data[0])])  # not suspended: runs at once
    assert dev.pread(h, 0, PAGE) == data


# -- no-ops ----------------------------------------------------------------------------


def test_resume_while_running_and_suspend_twice_are_no_ops(make_env):
    dev = make_env(vram="8M").open()
    h, data = _dirty_in_vram(dev, PAGE, seed=2)
    dev.resume()
    assert dev.info(h).placement == "vram"
    dev.suspend()
    dev.suspend()
    assert dev.stats()["vram_bytes"] == 0
    dev.resume()
    dev.resume()
    dev.execbuffer([Fill(dst=h, offset=0, length=4, byte=9)])
    assert dev.pread(h, 0, PAGE) == b"\x09" * 4 + data[4:]


# -- saving VRAM -----------------------------------------------------------------------


def test_suspend_saves_every_object_and_empties_vram(make_env):
    dev = make_env(vram="8M").open()
    objs = [_dirty_in_vram(dev, 512 * 1024, seed=10 + i) for i in range(4)]
    objs += [_only_in_vram(dev, 256 * 1024, byte=20 + i) for i in range(3)]
    clean = dev.create(PAGE)  # in VRAM, only read by the device: its system copy is current
    dev.pwrite(clean, 0, b"clean")
    dev.execbuffer([Copy(src=clean, src_offset=0, dst=objs[0][0], dst_offset=0, length=5)])
    objs[0] = (objs[0][0], b"clean" + objs[0][1][5:])
    cached = dev.create(PAGE)
    dev.set_caching(cached, ugem.CACHING_CACHED)
    dev.execbuffer([Fill(dst=cached, offset=0, length=PAGE, byte=0xCA)])
    assert dev.stats()["vram_bytes"] > 0
    dev.suspend()
    stats = dev.stats()
    assert stats["vram_bytes"] == 0
    assert all(dev.info(h).placement in ("system", "spilled") for h, _ in objs)
    assert dev.busy(objs[-1][0]) is False
    for h, want in objs:  # while suspended: nothing needs the device to read them
        assert dev.pread(h, 0, len(want)) == want
    assert dev.pread(clean, 0, 5) == b"clean"
    assert dev.pread(cached, 0, PAGE) == b"\xca" * PAGE
    dev.resume()
    for h, want in objs:
        assert dev.pread(h, 0, len(want)) == want
    fence = dev.execbuffer([Fill(dst=objs[1][0], offset=0, length=8, byte=1)])
    assert dev.wait_fence(fence, -1) == -1
    assert dev.pread(objs[1][0], 0, 8) == b"\x01" * 8


def test_suspend_of_more_large_objects_than_device_files_saves_each_one_exactly(make_env):
    # objects of 1 MiB and more are copied out with pwritev through a description of their
    # memfd, at most 64 at once: 72 such objects take both paths; some hold holes
    dev = make_env(vram="96M").open()
    objs = [_only_in_vram(dev, MiB, byte=1 + i) for i in range(40)]
    objs += [_dirty_in_vram(dev, MiB + PAGE, seed=100 + i) for i in range(24)]
    sparse = []
    for i in range(8):  # one page written by the device in a 2 MiB object with no other pages
        h = dev.create(2 * MiB)
        dev.execbuffer([Fill(dst=h, offset=MiB + i * PAGE, length=PAGE, byte=0x60 + i)])
        sparse.append((h, MiB + i * PAGE, 0x60 + i))
    resident = dev.stats()["resident_bytes"]
    dev.suspend()
    stats = dev.stats()
    assert stats["vram_bytes"] == 0
    # the sparse ones came back with one page each: holes stay holes on the write path too
    assert stats["resident_bytes"] - resident <= 40 * MiB + 8 * PAGE
    dev.resume()
    for h, want in objs:
        assert dev.pread(h, 0, len(want)) == want
    for h, offset, byte in sparse:
        assert dev.pread(h, offset - 8, PAGE + 16) == bytes(8) + bytes([byte]) * PAGE + bytes(8)
        assert dev.pread(h, 0, 16) == bytes(16)


def test_suspend_saves_objects_pinned_in_vram(make_env):
    dev = make_env(vram="8M").open()
    h, data = _dirty_in_vram(dev, MiB, seed=3)
    dev.pin(h)
    assert dev.info(h).placement == "vram"
    dev.suspend()
    assert dev.stats()["vram_bytes"] == 0
    assert dev.pread(h, 0, MiB) == data
    dev.resume()
    assert dev.pread(h, 0, MiB) == data
    assert dev.info(h).pinned


def test_suspend_waits_for_device_work(make_env):
    dev = make_env(vram="8M", hang_timeout=5).open()
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    m = dev.mmap(sem)
    h = dev.create(PAGE)
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1), Fill(dst=h, offset=0, length=PAGE, byte=0x5E)])
    releaser = threading.Timer(0.3, lambda: m.__setitem__(slice(0, 4), (1).to_bytes(4, "little")))
    releaser.start()
    try:
        start = time.monotonic()
        dev.suspend()
        elapsed = time.monotonic() - start
    finally:
        releaser.join()
        m[0:4] = (1).to_bytes(4, "little")
        m.release()
    assert elapsed >= 0.25
    assert dev.busy(h) is False
    assert dev.stats()["vram_bytes"] == 0
    assert dev.pread(h, 0, PAGE) == b"\x5e" * PAGE
    dev.resume()


@contextlib.contextmanager
def _device_held_until_purged(dev, watcher, marker: int):
    """Hold the device (a SemaphoreWait on a CACHED page) until `marker`, a DONTNEED page,
    has been purged (`watcher`, another client, looks): a request that needs room purges
    it first and then, if only device work holds the rest, waits for that work; the
    device is released only then, so that request has proven it waits."""
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    view = dev.mmap(sem)
    view[0:4] = (0).to_bytes(4, "little")  # its page counts under the budget from now on
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])
    done = threading.Event()
    watched, _ = watcher.open_name(dev.flink(marker))

    def release_once_purged() -> None:
        while not done.is_set() and watcher.info(watched).placement != "purged":
            time.sleep(0.01)
        view[0:4] = (1).to_bytes(4, "little")

    releaser = threading.Thread(target=release_once_purged)
    releaser.start()
    try:
        yield
    finally:
        done.set()
        releaser.join(120)
        view[0:4] = (1).to_bytes(4, "little")
        view.release()


@pytest.mark.parametrize("history", ["only-in-vram", "written-first"])
def test_suspend_past_the_system_budget_spills_instead_of_failing(make_env, history):
    env = make_env(vram="16M", system_budget="8M", hang_timeout=120)
    dev = env.open()
    if history == "only-in-vram":
        objs = [_only_in_vram(dev, 2 * MiB, byte=0x30 + i) for i in range(7)]
    else:  # written by the CPU, then dirtied in VRAM while the device is held: the fourth
        # pwrite finds the rest of the budget held by busy objects (their spare copies) and
        # must wait for the device (the oldest then spilled or dropped), never fail ENOMEM
        marker = dev.create(PAGE)
        dev.pwrite(marker, 0, b"purged first")
        dev.madvise(marker, ugem.DONTNEED)
        with _device_held_until_purged(dev, env.open(), marker):
            objs = [_dirty_in_vram(dev, 2 * MiB, seed=0x30 + i) for i in range(7)]
        assert dev.info(marker).placement == "purged"
    dev.wait(objs[-1][0], -1)
    assert dev.stats()["vram_bytes"] == 14 * MiB  # 14 MiB in VRAM, 8 MiB of system budget
    dev.suspend()
    stats = dev.stats()
    assert stats["vram_bytes"] == 0
    assert stats["resident_bytes"] <= 8 * MiB
    assert stats["spilled_total"] > 0 and stats["spilled_bytes"] > 0
    dev.resume()
    for h, want in objs:
        assert dev.pread(h, 0, 2 * MiB) == want


@contextlib.contextmanager
def _small_filesystem(directory, size: str):
    """A tmpfs of `size` at `directory` (for a spill directory that really runs out of room)."""
    os.makedirs(directory)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield str(directory)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


@contextlib.contextmanager
def _device(mode: str, spill_dir: str, **config):
    if mode == "embedded":
        with ugem.Manager(spill_dir=spill_dir, **config) as manager, manager.open() as dev:
            yield dev
    else:
        with run_daemon(spill_dir=spill_dir, **config) as daemon, daemon.connect() as dev:
            yield dev


# 6 MiB must be spilled to suspend; reading everything back afterwards rotates objects
# through spill storage (a restore's space is given back only once it has landed), so the
# case that fits gets room for that too.
@pytest.mark.parametrize("spill_space, fits", [("4M", False), ("12M", True)])
def test_suspend_fails_with_enospc_and_changes_nothing_when_the_host_cannot_hold_vram(
        mode, tmp_path, errno_of, spill_space, fits):
    # 14 MiB only in VRAM, 8 MiB of budget: 6 MiB must be spilled
    with _small_filesystem(tmp_path / "spill", spill_space) as spill, \
            _device(mode, spill, vram="16M", system_budget="8M") as dev:
        objs = [_only_in_vram(dev, 2 * MiB, byte=0x30 + i) for i in range(7)]
        dev.wait(objs[-1][0], -1)
        if fits:
            dev.suspend()
            assert dev.stats()["vram_bytes"] == 0 and dev.stats()["spilled_bytes"] >= 6 * MiB
            dev.resume()
        else:
            assert errno_of(dev.suspend) == errno.ENOSPC
            stats = dev.stats()
            assert (stats["vram_bytes"], stats["evicted_total"], stats["spilled_total"]) == (14 * MiB, 0, 0)
            assert stats["suspended"] is False
            assert all(dev.info(h).placement == "vram" for h, _ in objs)
        fence = dev.execbuffer([Fill(dst=objs[0][0], offset=0, length=2, byte=0x30)])  # running
        assert dev.wait_fence(fence, -1) == -1
        for h, want in objs:
            assert dev.pread(h, 0, 2 * MiB) == want


def test_spillable_objects_are_not_extra_room_for_suspend(mode, tmp_path, errno_of):
    # The budget is full of spillable objects and spill storage has no room: spilling
    # them to make room would need the same space, so saving 2 MiB of VRAM is ENOSPC.
    with _small_filesystem(tmp_path / "spill", "64K") as spill, \
            _device(mode, spill, vram="16M", system_budget="8M") as dev:
        written = [dev.create(2 * MiB) for _ in range(4)]
        for i, h in enumerate(written):
            dev.pwrite(h, 0, bytes([i]) * 2 * MiB)
        vram, want = _only_in_vram(dev, 2 * MiB, byte=0x77)
        dev.wait(vram, -1)
        assert errno_of(dev.suspend) == errno.ENOSPC
        assert dev.info(vram).placement == "vram"
        assert dev.stats()["resident_bytes"] <= 8 * MiB
        dev.execbuffer([Fill(dst=vram, offset=0, length=2, byte=0x77)])  # not suspended
        assert dev.pread(vram, 0, 2 * MiB) == want
        for i, h in enumerate(written):
            assert dev.pread(h, 0, 2 * MiB) == bytes([i]) * 2 * MiB


def test_dontneed_objects_in_vram_are_purged_by_suspend(make_env, errno_of):
    dev = make_env(vram="8M").open()
    gone, _ = _dirty_in_vram(dev, MiB, seed=4)
    kept, kept_data = _dirty_in_vram(dev, MiB, seed=5)
    assert dev.madvise(gone, ugem.DONTNEED) is True  # in VRAM: resident, not purged yet
    purged = dev.stats()["purged_total"]
    dev.suspend()
    info = dev.info(gone)
    assert (info.placement, info.madvise) == ("purged", "purged")
    assert dev.stats()["purged_total"] == purged + 1
    assert errno_of(dev.pread, gone, 0, 16) == errno.EFAULT
    dev.resume()
    assert dev.madvise(gone, ugem.WILLNEED) is False
    assert dev.pread(kept, 0, MiB) == kept_data


# -- the order of suspend and resume, stats()["suspended"] -------------------------------


def test_stats_say_whether_the_device_is_suspended(make_env):
    dev = make_env(vram="8M").open()
    assert dev.stats()["suspended"] is False
    dev.suspend()
    assert dev.stats()["suspended"] is True
    dev.resume()
    assert dev.stats()["suspended"] is False


@contextlib.contextmanager
def _held_device(dev):
    """Hold the device with a SemaphoreWait on a CACHED object until the block ends."""
    sem = dev.create(PAGE)
    dev.set_caching(sem, ugem.CACHING_CACHED)
    view = dev.mmap(sem)
    dev.execbuffer([SemaphoreWait(obj=sem, offset=0, value=1)])
    try:
        yield
    finally:
        view[0:4] = (1).to_bytes(4, "little")
        view.release()


def test_a_resume_sent_while_a_suspend_waits_for_the_device_leaves_it_running(make_env):
    # suspend's "wait for all device work" parks behind a SemaphoreWait; a resume from a
    # second client arrives meanwhile; once both have returned the device runs
    env = make_env(vram="8M", hang_timeout=120)
    dev, admin, other = env.open(), env.open(), env.open()
    h, data = _dirty_in_vram(dev, PAGE, seed=8)
    with _held_device(dev):
        thread, out = _in_thread(admin.suspend)
        # the suspend has begun once it holds new work: stats say so
        wait_until(lambda: other.stats()["suspended"] or out, timeout=120, what="the suspend to begin")
        assert not out, f"suspend returned while the device was held: {out}"
        other.resume()
        assert other.stats()["suspended"] is False
    thread.join(120)
    assert out and out[0][0] is None, out
    assert dev.stats()["suspended"] is False
    thread, out = _in_thread(dev.execbuffer, [Fill(dst=h, offset=0, length=4, byte=0x66)])
    thread.join(120)  # not held
    assert out and isinstance(out[0][0], int), out
    assert dev.wait_fence(out[0][0], -1) == -1
    assert dev.pread(h, 0, PAGE) == b"\x66" * 4 + data[4:]


def test_a_suspend_sent_after_a_resume_takes_effect_after_it(make_env):
    # suspend, resume, suspend while the device is held: the second suspend is the last
    env = make_env(vram="8M", hang_timeout=120)
    dev, admin, other = env.open(), env.open(), env.open()
    h, data = _dirty_in_vram(dev, PAGE, seed=9)
    with _held_device(dev):
        first, out = _in_thread(admin.suspend)
        wait_until(lambda: other.stats()["suspended"] or out, timeout=120, what="the suspend to begin")
        other.resume()
        second, out2 = _in_thread(other.suspend)
        wait_until(lambda: dev.stats()["suspended"] or out2, timeout=120, what="the second suspend to begin")
    first.join(120)
    second.join(120)
    assert out and out[0][0] is None and out2 and out2[0][0] is None, (out, out2)
    assert dev.stats()["suspended"] is True
    assert dev.stats()["vram_bytes"] == 0
    dev.resume()
    assert dev.pread(h, 0, PAGE) == data


def test_a_suspend_whose_client_dies_while_it_waits_leaves_the_device_running(make_env, mode):
    if mode == "embedded":
        pytest.skip("needs a client process to kill")
    env = make_env(vram="8M", hang_timeout=120)
    dev = env.open()
    h, data = _dirty_in_vram(dev, PAGE, seed=10)
    with _held_device(dev):
        pid = os.fork()
        if pid == 0:  # the suspending client, killed while its suspend waits
            try:
                ugem.connect(env.daemon.path).suspend()
            finally:
                os._exit(0)
        try:
            wait_until(lambda: dev.stats()["suspended"], timeout=120, what="the suspend to begin")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        wait_until(lambda: not dev.stats()["suspended"], timeout=120, what="the abandoned suspend to end")
    fence = dev.execbuffer([Fill(dst=h, offset=0, length=4, byte=0x67)])
    assert dev.wait_fence(fence, -1) == -1
    assert dev.pread(h, 0, PAGE) == b"\x67" * 4 + data[4:]


# -- device work while suspended -------------------------------------------------------


def test_embedded_execbuffer_while_suspended_is_ebusy(make_env, mode, errno_of):
    if mode == "daemon":
        pytest.skip("the daemon holds device work until resume instead")
    dev = make_env(vram="8M").open()
    h, data = _dirty_in_vram(dev, PAGE, seed=6)
    dev.suspend()
    assert errno_of(dev.execbuffer, [Fill(dst=h, offset=0, length=4, byte=1)]) == errno.EBUSY
    assert errno_of(dev.set_domain, h, ugem.DOMAIN_DEVICE) == errno.EBUSY
    assert dev.info(h).placement == "system"
    dev.resume()
    dev.execbuffer([Fill(dst=h, offset=0, length=4, byte=1)])
    assert dev.pread(h, 0, PAGE) == b"\x01" * 4 + data[4:]


@pytest.mark.parametrize("fault", ["enoent", "einval", "efault"])
def test_earlier_errors_win_while_suspended(make_env, errno_of, fault):
    dev = make_env(vram="8M").open()
    h = dev.create(PAGE)
    purged = dev.create(PAGE)
    dev.madvise(purged, ugem.DONTNEED)
    dev.suspend()
    cmd, code = {
        "enoent": (Fill(dst=99, offset=0, length=1, byte=1), errno.ENOENT),
        "einval": (Fill(dst=h, offset=PAGE, length=1, byte=1), errno.EINVAL),
        "efault": (Fill(dst=purged, offset=0, length=1, byte=1), errno.EFAULT),
    }[fault]
    assert errno_of(dev.execbuffer, [cmd]) == code
    dev.resume()


def test_daemon_holds_execbuffer_until_another_client_resumes(make_env, mode):
    if mode == "embedded":
        pytest.skip("the embedded manager fails device work with EBUSY instead")
    env = make_env(vram="8M")
    dev, admin = env.open(), env.open()
    h, data = _dirty_in_vram(dev, PAGE, seed=7)
    admin.suspend()
    thread, out = _in_thread(dev.execbuffer, [Fill(dst=h, offset=0, length=4, byte=0x44)])
    try:
        time.sleep(0.3)
        assert not out, f"execbuffer returned while suspended: {out}"
        start = time.monotonic()  # others are served meanwhile
        other = admin.create(PAGE)
        admin.pwrite(other, 0, b"meanwhile")
        assert admin.pread(other, 0, 9) == b"meanwhile"
        assert time.monotonic() - start < 1.0
    finally:
        admin.resume()
        thread.join(10)
    assert out and isinstance(out[0][0], int), out
    fence = out[0][0]
    assert dev.wait_fence(fence, -1) == -1
    assert dev.pread(h, 0, PAGE) == b"\x44" * 4 + data[4:]


def test_daemon_holds_set_domain_device_until_resume(make_env, mode):
    if mode == "embedded":
        pytest.skip("the embedded manager fails it with EBUSY instead")
    env = make_env(vram="8M")
    dev, admin = env.open(), env.open()
    h = dev.create(PAGE)
    dev.pwrite(h, 0, b"to the device")
    admin.suspend()
    thread, out = _in_thread(dev.set_domain, h, ugem.DOMAIN_DEVICE)
    try:
        time.sleep(0.3)
        assert not out, out
    finally:
        admin.resume()
        thread.join(10)
    assert out == [(None, out[0][1])]
    assert dev.info(h).placement == "vram"


def test_daemon_fails_held_work_with_eshutdown_on_sigterm(make_env, mode):
    if mode == "embedded":
        pytest.skip("only the daemon holds device work")
    env = make_env(vram="8M")
    dev = env.open()
    h = dev.create(PAGE)
    dev.suspend()
    thread, out = _in_thread(dev.execbuffer, [Fill(dst=h, offset=0, length=4, byte=1)])
    time.sleep(0.3)
    assert not out
    os.kill(env.daemon.pid, signal.SIGTERM)
    thread.join(10)
    assert out and isinstance(out[0][0], ugem.UgemError), out
    assert out[0][0].errno == errno.ESHUTDOWN
    assert env.daemon.proc.wait(20) == 0
