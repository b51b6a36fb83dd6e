"""The simulated device's direct path (gpu/sim.py `_direct`): a short list of Fills and
Copies on surfaces in device memory runs straight on one array over device memory, with
the same result as the general path (`run_op`, through `commands.execute`), and refuses,
writing nothing, whatever it does not handle.

Hypothesis draws a fresh seed per run; replay with ``pytest --hypothesis-seed=<n>``."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ugem.cmd import Blit, Copy, Fill, SemaphoreWait
from ugem.gpu.base import Execute, Surface
from ugem.gpu.sim import SimGpu, _direct, run_op

VRAM = 3 * 4096


def surfaces_st() -> st.SearchStrategy[dict[int, Surface]]:
    """Two or three handles on small surfaces that may overlap (two handles of one object,
    or neighbouring objects), all inside VRAM."""
    def surface(draw_base: int, size: int) -> Surface:
        return Surface(size, vram=draw_base)
    one = st.builds(surface, st.integers(0, VRAM - 1024), st.integers(1, 1024))
    return st.dictionaries(st.integers(1, 3), one, min_size=1, max_size=3)


@st.composite
def ops(draw: st.DrawFn) -> Execute:
    surfaces = draw(surfaces_st())
    handles = sorted(surfaces)
    commands: list[Fill | Copy] = []
    for _ in range(draw(st.integers(1, 16))):
        dst = draw(st.sampled_from(handles))
        size = surfaces[dst].size
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, size - offset))
        if draw(st.booleans()):
            commands.append(Fill(dst=dst, offset=offset, length=length, byte=draw(st.integers(0, 255))))
        else:
            src = draw(st.sampled_from(handles))
            src_size = surfaces[src].size
            length = min(length, src_size)
            src_offset = draw(st.integers(0, src_size - length))
            commands.append(Copy(src=src, dst=dst, src_offset=src_offset, dst_offset=offset, length=length))
    return Execute(commands, surfaces)


def memory() -> bytearray:
    return bytearray(np.random.default_rng(7).integers(0, 256, VRAM, dtype=np.uint8).tobytes())


@settings(max_examples=300, deadline=None)
@given(ops())
def test_direct_path_writes_what_the_general_path_writes(op: Execute) -> None:
    direct, general = memory(), memory()
    assert _direct(np.frombuffer(direct, np.uint8), op)
    run_op(memoryview(general), op)
    assert direct == general


def refused(op: Execute) -> None:
    mem = memory()
    assert not _direct(np.frombuffer(mem, np.uint8), op)
    assert mem == memory()  # nothing written


def test_direct_path_refuses_host_surfaces_other_commands_and_bad_ranges() -> None:
    vram = {1: Surface(4096, vram=0)}
    host = {1: Surface(4096, vram=0), 2: Surface(4096, host=bytearray(4096))}
    refused(Execute([Fill(dst=1, offset=0, length=16, byte=1)], host))  # a host surface among them
    refused(Execute([Fill(dst=1, offset=0, length=16, byte=1),
                     SemaphoreWait(obj=1, offset=0, value=1)], vram))
    refused(Execute([Blit(src=1, dst=1, src_pitch=64, dst_pitch=64, src_x=0, src_y=0, dst_x=1, dst_y=1,
                          width=1, height=1, cpp=1)], vram))
    refused(Execute([Fill(dst=1, offset=0, length=16, byte=1),  # the first one is fine, the second is not
                     Fill(dst=1, offset=4090, length=16, byte=2)], vram))
    refused(Execute([Fill(dst=2, offset=0, length=16, byte=1)], vram))  # a handle without a surface
    refused(Execute([Fill(dst=1, offset=0, length=16, byte=256)], vram))


def test_an_idle_device_runs_short_lists_at_once_and_the_rest_on_its_timeline() -> None:
    notified: list[int] = []
    with SimGpu(vram_size=VRAM, hang_timeout=5.0) as gpu:
        gpu.set_notify(notified.append)
        seq = gpu.submit(Execute([Fill(dst=1, offset=8, length=8, byte=0xAB),
                                  Copy(src=1, dst=2, src_offset=8, dst_offset=0, length=8)],
                                 {1: Surface(4096, vram=0), 2: Surface(4096, vram=4096)}))
        assert gpu.completed() == seq and notified == [seq]  # done before submit returned
        assert gpu.error(seq) is None
        assert gpu.read_vram(8, 8) == b"\xab" * 8 and gpu.read_vram(4096, 8) == b"\xab" * 8
        bad = gpu.submit(Execute([Fill(dst=1, offset=0, length=16, byte=1)], {1: Surface(8, vram=0)}))
        assert gpu.wait(bad, 5.0) and gpu.error(bad) is not None  # out of its surface: the general path fails it
