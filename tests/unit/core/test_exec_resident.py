"""execbuffer's short path for working sets already in VRAM (core/gem_exec.py `_resident`)
does what the general path does: the same contents, evictions, busy state, errors.

The same random sequence of operations runs on two embedded managers with a small VRAM
(8 objects of 16 KiB fill it, so submissions keep evicting each other), one with the
short path switched off; everything observable must match after every step."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

import ugem
from ugem.cmd import Copy, Fill
from ugem.core import gem_exec
from ugem.errors import UgemError

OBJ = 16 << 10
VRAM = 8 * OBJ


def run(seed: int, short_path: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Each step's observable outcome, for the sequence of `seed`."""
    with monkeypatch.context() as patch:
        if not short_path:
            patch.setattr(gem_exec, "_resident", lambda core, client, cmds: 0)
        rng = random.Random(seed)
        with ugem.Manager(vram=VRAM, system_budget=64 * OBJ) as manager:
            dev = manager.open()
            handles = [dev.create(OBJ) for _ in range(12)]
            readonly = dev.import_fd(dev.export(handles[0], writable=False))  # a read-only handle
            for _ in range(200):
                choice = rng.random()
                h = rng.choice(handles + [readonly, 9999])
                try:
                    if choice < 0.6:  # a short list of Fills and Copies, sometimes out of range
                        cmds: list[Fill | Copy] = []
                        for _ in range(rng.randint(1, 4)):
                            if rng.random() < 0.5:
                                offset = rng.randrange(OBJ + 64)
                                cmds.append(Fill(dst=h, offset=offset, length=rng.randint(1, 512),
                                                 byte=rng.randrange(256)))
                            else:
                                cmds.append(Copy(src=rng.choice(handles), dst=h, src_offset=rng.randrange(OBJ - 512),
                                                 dst_offset=rng.randrange(OBJ - 512), length=rng.randint(1, 512)))
                        dev.execbuffer(cmds)
                        yield "exec", "ok"
                    elif choice < 0.75:
                        offset = rng.randrange(OBJ - 64)
                        yield "pread", dev.pread(h, offset, 64)
                    elif choice < 0.85:
                        dev.set_domain(h, ugem.DOMAIN_CPU)
                        yield "cpu", "ok"  # (busy() after it depends on when the device thread runs)
                    elif choice < 0.95:
                        dev.pwrite(h, rng.randrange(OBJ - 8), bytes([rng.randrange(256)]) * 8)
                        yield "pwrite", "ok"
                    else:
                        dev.pin(h) if rng.random() < 0.5 else dev.unpin(h)
                        yield "pin", "ok"
                except UgemError as exc:
                    yield "error", exc.errno
                stats = dev.stats()
                yield stats["evicted_total"], stats["vram_bytes"]
            for h in handles:
                yield dev.pread(h, 0, OBJ)


@pytest.mark.parametrize("seed", range(6))
def test_short_path_matches_the_general_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    general = list(run(seed, False, monkeypatch))
    short = list(run(seed, True, monkeypatch))
    assert len(short) == len(general)
    for step, (a, b) in enumerate(zip(short, general, strict=True)):
        assert a == b, f"step {step // 2}: {a!r} with the short path, {b!r} without"


def test_short_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    real = gem_exec._resident
    monkeypatch.setattr(gem_exec, "_resident", lambda core, client, cmds: taken.append(real(core, client, cmds))
                        or taken[-1])
    with ugem.Manager(vram=VRAM) as manager:
        dev = manager.open()
        h = dev.create(OBJ)
        first = dev.execbuffer([Fill(dst=h, offset=0, length=8, byte=1)])  # moves it in: the general path
        second = dev.execbuffer([Fill(dst=h, offset=8, length=8, byte=2)])  # resident: the short path
        assert taken == [0, second] and second > first
        dev.wait_fence(second, -1)
        assert dev.pread(h, 0, 16) == b"\x01" * 8 + b"\x02" * 8
