"""core/memory.py against an embedded manager whose limits a test can shrink: spill
storage that runs out (its range), and reclaim that must wait for device work."""

from __future__ import annotations

import errno

import pytest

import ugem
from ugem.backing import spill
from ugem.testing.data import random_bytes, write_new

MiB = 1 << 20


def test_spill_range_running_out_is_enomem_naming_the_directory_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "_CAPACITY", 4 * MiB)
    with ugem.Manager(system_budget="8M", spill_dir=str(tmp_path)) as manager, manager.open() as dev:
        objects = dict(write_new(dev, MiB, seed=i) for i in range(12))  # 4 MiB spilled: the range is full
        assert dev.stats()["spilled_bytes"] == 4 * MiB
        h = dev.create(MiB)
        before = dev.stats()
        with pytest.raises(ugem.UgemError) as failed:
            dev.pwrite(h, 0, random_bytes(99, MiB))
        assert failed.value.errno == errno.ENOMEM
        assert str(tmp_path) in str(failed.value) and "full" in str(failed.value)
        assert dev.stats()["spilled_bytes"] == before["spilled_bytes"]
        resident = [x for x in objects if dev.info(x).placement == "system"]
        for x in resident[:4]:  # room for the spilled ones to come back
            dev.close_handle(x)
            del objects[x]
        for x, data in objects.items():
            assert dev.pread(x, 0, MiB) == data
