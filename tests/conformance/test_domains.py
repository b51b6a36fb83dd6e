"""set_domain and the CPU/device hand-over (SPEC §2 set_domain, §3 "caching and domains";
gem-reference §2.4 SET_DOMAIN, §5.6).

The simulated device is deliberately non-coherent for CACHING_NONE objects: it works on its
own copy in VRAM, and a mapping shows only what was handed over. These tests show both
halves: what a client that forgets set_domain sees (stale bytes, lost CPU writes), and that
the protocol (or CACHED) makes it right. pread/pwrite hand over by themselves, so the
stale views are observed through mappings.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import ugem
from ugem.cmd import Copy, Fill

PAGE = ugem.PAGE_SIZE
MiB = 1 << 20
CPU, DEVICE = ugem.DOMAIN_CPU, ugem.DOMAIN_DEVICE


def _data(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def _written(dev, size: int, seed: int) -> tuple[int, bytes]:
    h = dev.create(size)
    data = _data(seed, size)
    dev.pwrite(h, 0, data)
    return h, data


# -- errno -----------------------------------------------------------------------------


@pytest.mark.parametrize("read, write", [
    (0x4, 0), (0x40, 0), (0x80, 0), (2**31, 0), (CPU | 0x4, 0), (CPU | DEVICE, 0),
    (CPU, 0x4), (CPU, CPU | 0x4), (CPU | DEVICE, CPU | DEVICE), (0, 0x8),
])
def test_unknown_bits_or_both_domains_are_einval(dev, errno_of, read, write):
    h = dev.create(PAGE)
    assert errno_of(dev.set_domain, h, read, write) == errno.EINVAL


@pytest.mark.parametrize("read, write", [(CPU, DEVICE), (DEVICE, CPU), (0, CPU), (0, DEVICE)])
def test_write_domain_other_than_the_read_domain_is_einval(dev, errno_of, read, write):
    h = dev.create(PAGE)
    assert errno_of(dev.set_domain, h, read, write) == errno.EINVAL


@pytest.mark.parametrize("read, write", [(CPU | DEVICE, 0), (CPU, DEVICE), (0x4, 0)])
def test_einval_comes_before_the_lookup(dev, errno_of, read, write):
    assert errno_of(dev.set_domain, 99, read, write) == errno.EINVAL


@pytest.mark.parametrize("handle", [0, 1, 99, 2**32])
def test_read_domains_zero_is_a_no_op_even_for_a_bad_handle(dev, handle):
    assert dev.set_domain(handle, 0) is None
    assert dev.set_domain(handle, 0, 0) is None


def test_read_domains_zero_changes_nothing(dev):
    h = dev.create(PAGE)
    dev.execbuffer([Fill(dst=h, offset=0, length=1, byte=1)])
    dev.wait(h, -1)
    dev.set_domain(h, 0)
    assert dev.info(h).placement == "vram"


@pytest.mark.parametrize("domain", [CPU, DEVICE])
@pytest.mark.parametrize("handle", [0, 2, 99, 2**32])
def test_unknown_handle_is_enoent(dev, errno_of, domain, handle):
    dev.create(PAGE)
    assert errno_of(dev.set_domain, handle, domain) == errno.ENOENT
    assert errno_of(dev.set_domain, handle, domain, domain) == errno.ENOENT


@pytest.mark.parametrize("domain", [CPU, DEVICE])
def test_purged_object_is_efault(dev, errno_of, domain):
    h = dev.create(PAGE)
    assert dev.madvise(h, ugem.DONTNEED) is False
    assert errno_of(dev.set_domain, h, domain) == errno.EFAULT
    assert errno_of(dev.set_domain, h, domain, domain) == errno.EFAULT


@pytest.mark.parametrize("domain", [CPU, DEVICE])
def test_foreign_import_is_enxio(dev, errno_of, sealed_memfd, domain):
    h = dev.import_fd(sealed_memfd(PAGE, data=b"theirs"))
    assert errno_of(dev.set_domain, h, domain) == errno.ENXIO
    assert errno_of(dev.set_domain, h, domain, domain) == errno.ENXIO
    assert dev.pread(h, 0, 6) == b"theirs"


def test_cpu_domain_of_an_object_pinned_in_vram_is_ebusy(dev, errno_of):
    h = dev.create(PAGE)
    dev.execbuffer([Fill(dst=h, offset=0, length=PAGE, byte=4)])
    dev.pin(h)
    assert dev.info(h).placement == "vram"
    assert errno_of(dev.set_domain, h, CPU) == errno.EBUSY
    assert errno_of(dev.set_domain, h, CPU, CPU) == errno.EBUSY
    dev.set_domain(h, DEVICE)  # already the device's
    assert dev.info(h).placement == "vram"
    dev.unpin(h)
    dev.set_domain(h, CPU)
    assert dev.info(h).placement == "system"
    assert dev.pread(h, 0, PAGE) == b"\x04" * PAGE


def test_device_domain_larger_than_vram_is_enospc(make_env, errno_of):
    dev = make_env(vram="4M").open()
    h, data = _written(dev, 8 * MiB, seed=1)
    assert errno_of(dev.set_domain, h, DEVICE) == errno.ENOSPC
    assert dev.info(h).placement == "system"
    assert dev.stats()["vram_bytes"] == 0
    assert dev.pread(h, 0, 8 * MiB) == data


# -- placement -------------------------------------------------------------------------


def test_device_domain_moves_to_vram_and_cpu_domain_back(dev):
    h, data = _written(dev, 2 * PAGE, seed=1)
    dev.set_domain(h, DEVICE)
    assert dev.info(h).placement == "vram"
    dev.set_domain(h, DEVICE, DEVICE)  # again: nothing to do
    dev.set_domain(h, CPU)
    assert dev.info(h).placement == "system"
    dev.set_domain(h, CPU, CPU)
    assert dev.pread(h, 0, 2 * PAGE) == data


def test_cpu_domain_frees_the_vram_copy(make_env):
    dev = make_env(vram="8M").open()
    h = dev.create(MiB)
    dev.set_domain(h, DEVICE)
    assert dev.stats()["vram_bytes"] == MiB
    dev.set_domain(h, CPU)
    assert dev.stats()["vram_bytes"] == 0


@pytest.mark.parametrize("level", [ugem.CACHING_CACHED])
def test_device_domain_of_a_cached_object_stays_in_system_memory(dev, level):
    h, _ = _written(dev, PAGE, seed=2)
    dev.set_caching(h, level)
    dev.set_domain(h, DEVICE)
    assert dev.info(h).placement == "system"


def test_display_caching_behaves_as_none(dev):
    h, _ = _written(dev, PAGE, seed=2)
    dev.set_caching(h, ugem.CACHING_DISPLAY)
    dev.set_domain(h, DEVICE)
    assert dev.info(h).placement == "vram"


# -- device writes, CPU reads ----------------------------------------------------------


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_mapping_shows_device_writes_only_after_cpu_domain(dev, level):
    h, old = _written(dev, 2 * PAGE, seed=3)
    dev.set_caching(h, level)
    m = dev.mmap(h)  # made before the device touched the object
    dev.execbuffer([Fill(dst=h, offset=PAGE, length=PAGE, byte=0xAB)])
    assert dev.wait(h, -1) == -1
    assert bytes(m) == old  # the device wrote its own copy; nobody handed it back
    dev.set_domain(h, CPU)
    assert bytes(m) == old[:PAGE] + b"\xab" * PAGE
    assert dev.info(h).placement == "system"
    m.release()


def test_cached_mapping_shows_device_writes_after_wait(dev):
    h, old = _written(dev, 2 * PAGE, seed=3)
    dev.set_caching(h, ugem.CACHING_CACHED)
    m = dev.mmap(h)
    dev.execbuffer([Fill(dst=h, offset=PAGE, length=PAGE, byte=0xAB)])
    assert dev.wait(h, -1) == -1
    assert bytes(m) == old[:PAGE] + b"\xab" * PAGE
    assert dev.info(h).placement == "system"
    m.release()


def test_pread_hands_over_by_itself(dev):
    h, old = _written(dev, 2 * PAGE, seed=3)
    m = dev.mmap(h)
    dev.execbuffer([Fill(dst=h, offset=0, length=16, byte=0xCD)])
    assert dev.pread(h, 0, 32) == b"\xcd" * 16 + old[16:32]
    assert bytes(m[:32]) == b"\xcd" * 16 + old[16:32]  # the pread brought it back
    m.release()


# -- CPU writes, device reads ----------------------------------------------------------


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_cpu_writes_after_device_domain_are_not_seen_by_the_device(dev, level):
    src, old = _written(dev, PAGE, seed=4)
    dst = dev.create(PAGE)
    dev.set_caching(src, level)
    m = dev.mmap(src)
    dev.set_domain(src, DEVICE)  # the device takes its copy now
    m[0:8] = b"cpu-late"
    dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=PAGE)])
    assert dev.pread(dst, 0, PAGE) == old
    m.release()


@pytest.mark.parametrize("level", [ugem.CACHING_NONE, ugem.CACHING_DISPLAY])
def test_cpu_writes_handed_over_with_the_protocol_are_seen(dev, level):
    src, old = _written(dev, PAGE, seed=4)
    dst = dev.create(PAGE)
    dev.set_caching(src, level)
    dev.set_domain(src, DEVICE)
    dev.set_domain(src, CPU, CPU)
    m = dev.mmap(src)
    m[0:8] = b"cpu-ok!!"
    dev.set_domain(src, DEVICE)
    dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=PAGE)])
    assert dev.pread(dst, 0, PAGE) == b"cpu-ok!!" + old[8:]
    m.release()


def test_cached_cpu_writes_are_seen_without_the_protocol(dev):
    src, old = _written(dev, PAGE, seed=4)
    dst = dev.create(PAGE)
    dev.set_caching(src, ugem.CACHING_CACHED)
    m = dev.mmap(src)
    dev.set_domain(src, DEVICE)
    m[0:8] = b"snooped!"
    dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=PAGE)])
    assert dev.pread(dst, 0, PAGE) == b"snooped!" + old[8:]
    m.release()


def test_cpu_writes_through_a_mapping_before_first_device_use_are_seen(dev):
    # a mapping of an object the device never had: its copy in VRAM is taken at first use
    src, dst = dev.create(PAGE), dev.create(PAGE)
    m = dev.mmap(src)
    m[0:5] = b"first"
    dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=5)])
    assert dev.pread(dst, 0, 5) == b"first"
    m.release()


def test_pwrite_hands_over_by_itself(dev):
    src, old = _written(dev, PAGE, seed=5)
    dst = dev.create(PAGE)
    dev.set_domain(src, DEVICE)
    dev.pwrite(src, 0, b"pwrite")
    dev.execbuffer([Copy(src=src, src_offset=0, dst=dst, dst_offset=0, length=PAGE)])
    assert dev.pread(dst, 0, PAGE) == b"pwrite" + old[6:]
