"""Spill directories (backing/spill.py rules): one being made is never taken for a stale one
by a manager starting at the same moment; one whose maker is gone is removed."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

from ugem.backing.spill import SpillStore


def _make_and_close(spill_dir: str, times: int) -> str:
    """Make and close `times` stores in `spill_dir`; the first error, or ''."""
    try:
        for _ in range(times):
            SpillStore(spill_dir).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_managers_starting_together_never_remove_each_others_directory(tmp_path):
    """Each store sweeps the directory as it starts: before its directory was made under a
    hidden name and renamed once locked, one starting while another was between making its
    directory and locking it removed that directory, and the other failed (ENOENT)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        errors = pool.starmap(_make_and_close, [(str(tmp_path), 150)] * 4)
    assert errors == [""] * 4
    assert os.listdir(tmp_path) == []


def test_a_directory_being_made_stays_until_its_maker_is_gone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    mine = tmp_path / f".ugem-{os.getpid()}-abc"  # being made by this (live) process: its lock not yet taken
    gone = tmp_path / f".ugem-{dead}-abc"  # its maker died before renaming it
    for d in (mine, gone):
        d.mkdir()
        (d / "lock").write_bytes(b"")
    store = SpillStore(str(tmp_path))
    try:
        assert mine.is_dir() and not gone.exists()
        assert os.path.basename(store.directory).startswith(f"ugem-{os.getpid()}-")
        assert sorted(os.listdir(store.directory)) == ["lock", "spill-0", "spill-1"]
    finally:
        store.close()
    assert os.listdir(tmp_path) == [mine.name]
