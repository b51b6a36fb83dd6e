"""PressureWatch (daemon/pressure.py) against fake /proc/pressure/memory and /proc/meminfo."""

from __future__ import annotations

import pytest

from ugem.daemon.pressure import PressureWatch

MiB = 1 << 20
GiB = 1 << 30

PSI_CALM = ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def _psi(some_avg10: float, full_avg10: float = 0.0) -> str:
    return (f"some avg10={some_avg10:.2f} avg60=1.50 avg300=0.40 total=123456\n"
            f"full avg10={full_avg10:.2f} avg60=0.70 avg300=0.10 total=65432\n")


def _meminfo(total_kib: int, available_kib: int) -> str:
    return (f"MemTotal:       {total_kib} kB\n"
            f"MemFree:        {available_kib // 2} kB\n"
            f"MemAvailable:   {available_kib} kB\n"
            "Buffers:            1234 kB\n"
            "Cached:           567890 kB\n"
            "SwapTotal:             0 kB\n")


@pytest.fixture
def proc(tmp_path):
    """Write fake files; returns a factory of watches reading them."""
    psi, meminfo = tmp_path / "memory", tmp_path / "meminfo"

    def watch(psi_text: str | None = PSI_CALM, meminfo_text: str | None = None, **kwargs) -> PressureWatch:
        for path, text in ((psi, psi_text), (meminfo, meminfo_text)):
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
        return PressureWatch(psi_path=str(psi), meminfo_path=str(meminfo), **kwargs)

    return watch


# -- reading the files -----------------------------------------------------------------


def test_stall_reads_some_avg10(proc):
    assert proc(_psi(12.34, full_avg10=99.0)).stall() == pytest.approx(12.34)


def test_stall_is_zero_without_psi(proc):
    assert proc(psi_text=None).stall() == 0.0


def test_stall_is_zero_for_an_empty_psi_file(proc):
    assert proc(psi_text="").stall() == 0.0


def test_stall_without_a_some_line_is_zero(proc):
    assert proc("full avg10=50.00 avg60=0.00 avg300=0.00 total=1\n").stall() == 0.0


def test_available_reads_memavailable_and_memtotal_in_bytes(proc):
    watch = proc(meminfo_text=_meminfo(total_kib=8 * 1024 * 1024, available_kib=3 * 1024 * 1024))
    assert watch.available() == (3 * GiB, 8 * GiB)


def test_available_is_unknown_without_meminfo(proc):
    assert proc(meminfo_text=None).available() == (0, 0)


# -- deciding --------------------------------------------------------------------------


def test_no_pressure_means_no_target(proc):
    watch = proc(_psi(1.0), _meminfo(total_kib=8 << 20, available_kib=4 << 20))
    assert watch.check(512 * MiB) is None


def test_nothing_held_means_no_target(proc):
    watch = proc(_psi(90.0), _meminfo(total_kib=8 << 20, available_kib=1 << 10))
    assert watch.check(0) is None


def test_a_memory_stall_asks_for_a_quarter_back(proc):
    watch = proc(_psi(25.0), _meminfo(total_kib=8 << 20, available_kib=4 << 20))
    assert watch.check(400 * MiB) == 300 * MiB


def test_the_stall_threshold_is_inclusive(proc):
    watch = proc(_psi(10.0), _meminfo(total_kib=8 << 20, available_kib=4 << 20), stall_percent=10.0)
    assert watch.check(400 * MiB) == 300 * MiB
    watch = proc(_psi(9.99), _meminfo(total_kib=8 << 20, available_kib=4 << 20), stall_percent=10.0)
    assert watch.check(400 * MiB) is None


def test_a_stall_without_meminfo_still_shrinks(proc):
    watch = proc(_psi(50.0), meminfo_text=None)
    assert watch.check(400 * MiB) == 300 * MiB


def test_low_available_memory_without_psi_shrinks(proc):
    # 100 MiB available of 8 GiB is below 5 %; the shortfall (~310 MiB) is less than a quarter
    watch = proc(psi_text=None, meminfo_text=_meminfo(total_kib=8 << 20, available_kib=100 << 10))
    low = 8 * GiB * 5 / 100
    target = watch.check(2 * GiB)
    assert target == 2 * GiB - max(2 * GiB // 4, int(low - 100 * MiB))
    assert target == 1536 * MiB


def test_a_large_shortfall_asks_for_more_than_a_quarter(proc):
    # 1 MiB available of 16 GiB: the shortfall (~818 MiB) beats a quarter of 1 GiB
    watch = proc(psi_text=None, meminfo_text=_meminfo(total_kib=16 << 20, available_kib=1 << 10))
    shortfall = int(16 * GiB * 5 / 100 - MiB)
    assert watch.check(GiB) == GiB - shortfall


def test_the_target_never_goes_below_zero(proc):
    watch = proc(psi_text=None, meminfo_text=_meminfo(total_kib=16 << 20, available_kib=1 << 10))
    assert watch.check(100 * MiB) == 0


def test_available_memory_just_above_the_threshold_is_no_pressure(proc):
    total_kib = 10 << 20
    watch = proc(_psi(0.0), _meminfo(total_kib=total_kib, available_kib=total_kib * 5 // 100 + 1))
    assert watch.check(GiB) is None


def test_the_files_are_read_at_every_check(proc, tmp_path):
    watch = proc(_psi(0.0), _meminfo(total_kib=8 << 20, available_kib=4 << 20))
    assert watch.check(400 * MiB) is None
    (tmp_path / "memory").write_text(_psi(60.0))
    assert watch.check(400 * MiB) == 300 * MiB
    (tmp_path / "memory").write_text(_psi(0.0))
    assert watch.check(400 * MiB) is None


def test_defaults_read_the_real_proc_files():
    watch = PressureWatch()
    assert (watch.psi_path, watch.meminfo_path) == ("/proc/pressure/memory", "/proc/meminfo")
    available, total = watch.available()
    assert 0 < available <= total
    assert watch.stall() >= 0.0
