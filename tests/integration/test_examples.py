"""The runnable examples of docs/examples/ (docs/USAGE.md): each runs against an embedded
manager by default and against a real daemon with `--socket PATH`, exits 0 and prints
what it shows. The daemon variants get a fresh `ugem serve --system-budget 16M` each, the
budget the embedded runs use, so the purge and spill figures are the same both ways."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ugem.testing import run_daemon

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.fixture(params=["embedded", "daemon"])
def run_example(request: pytest.FixtureRequest, tmp_path: pathlib.Path):
    mode = request.param

    def run(name: str) -> tuple[str, str]:
        def go(extra: list[str]) -> tuple[str, str]:
            env = {**os.environ, "PYTHONWARNINGS": "always::ResourceWarning", "XDG_CACHE_HOME": str(tmp_path)}
            proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *extra], capture_output=True,
                                  text=True, timeout=120, cwd=tmp_path, env=env)
            assert proc.returncode == 0, f"{name} {mode} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
            return proc.stdout, mode
        if mode == "embedded":
            return go([])
        with run_daemon(system_budget="16M") as daemon:
            return go(["--socket", daemon.path])
    return run


def test_every_example_is_tested():
    assert NAMES == ["dontneed_cache", "memory_pressure", "share_by_fd", "share_by_name", "worker_pool"]


def _pids(out: str, *roles: str) -> list[int]:
    found = [re.findall(rf"^{role} \(pid (\d+)\)", out, re.M) for role in roles]
    assert all(found), out
    return [int(pids[0]) for pids in found]


def test_share_by_name(run_example):
    out, mode = run_example("share_by_name")
    assert "peer: set row 0 to -1" in out
    assert "creator: row 0 now reads -1.0 (the peer's write, no copy)" in out
    assert re.search(r"opened name 1 as handle 1, sum = 196603", out)
    creator, peer = _pids(out, "creator", "peer")
    assert (creator != peer) == (mode == "daemon")  # a second process needs a shared manager
    assert out.rstrip().endswith("ok")


def test_share_by_fd(run_example):
    out, mode = run_example("share_by_fd")
    how = "imported the fd as handle 1" if mode == "daemon" else "mapped the fd directly (524288 bytes)"
    assert how in out
    assert "parent: sent fd" in out and "child: sum = 2147450880" in out
    assert "parent: sum is now 4294901760 (the child's writes, no copy)" in out
    parent, child = _pids(out, "parent", "child")
    assert parent != child
    assert out.rstrip().endswith("ok")


def test_dontneed_cache(run_example):
    out, _ = run_example("dontneed_cache")
    m = re.search(r"pass 2: (\d+) retained \(madvise\(WILLNEED\) -> True\), (\d+) purged and recomputed", out)
    assert m, out
    retained, recomputed = int(m.group(1)), int(m.group(2))
    assert retained > 0 and recomputed > 0 and retained + recomputed == 32
    assert "note:" not in out
    assert "all 32 values correct" in out


def test_memory_pressure(run_example):
    out, _ = run_example("memory_pressure")
    m = re.search(r"after writing: placements \{(.*)\}", out)
    assert m and "'spilled'" in m.group(1), out
    assert "object 0 (mapped) is system" in out
    assert "read back: 48 of 48 objects intact" in out and "(<= budget: True)" in out
    assert "everything read back" in out


USAGE = EXAMPLES.parent / "USAGE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", USAGE.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_usage_blocks_run(index: int, tmp_path: pathlib.Path):
    """Every ```python block of docs/USAGE.md runs as it is: embedded managers only, except the
    Dask block, which says to start the node's daemon first (found through $UGEM_SOCKET) and
    must print the right mean and two ugem-backed workers."""
    env = {**os.environ, "PYTHONWARNINGS": "always::ResourceWarning", "XDG_CACHE_HOME": str(tmp_path)}
    with contextlib.ExitStack() as stack:
        if "ugem.dask" in BLOCKS[index]:
            pytest.importorskip("distributed")
            env["UGEM_SOCKET"] = stack.enter_context(run_daemon()).path
        proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"block {index}:\n{BLOCKS[index]}\n{proc.stdout}\n{proc.stderr}"
    assert "Warning" not in proc.stderr, proc.stderr
    if "ugem.dask" in BLOCKS[index]:
        lines = proc.stdout.splitlines()
        assert lines[0] == "1.0" and lines[1].count("'UgemBuffer'") == 2, proc.stdout


def test_usage_blocks_print_what_they_say():
    picked = [next(b for b in BLOCKS if marker in b) for marker in ("dev.new(10_000)", "cached = dev.new")]
    outputs = [subprocess.run([sys.executable, "-c", b], capture_output=True, text=True, timeout=120).stdout
               for b in picked]
    assert outputs[0].splitlines() == ["<Buffer handle=1 size=12288>", "none", "b'hello'", "12283", "True"]
    assert outputs[1].splitlines() == ["False", "b'\\x01'"]


def test_usage_default_device_block_prints_what_it_says(tmp_path: pathlib.Path):
    """Run where no daemon listens (the default Device is then embedded, its figures ours alone)."""
    block = next(b for b in BLOCKS if "ugem.default_device()" in b)
    env = {**os.environ, "UGEM_SOCKET": str(tmp_path / "none.sock"), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["(1024, 1024) float32 6.0", "0", "True", "2", "0", "[0. 0. 0.]"]


def test_usage_worker_sharing_block_prints_what_it_says(tmp_path: pathlib.Path):
    """The "sharing with worker processes" block: the workers' writes are seen by the parent."""
    block = next(b for b in BLOCKS if "def scale" in b)
    env = {**os.environ, "UGEM_SOCKET": str(tmp_path / "none.sock"), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[2000.0, 2000.0, 2000.0, 2000.0]", "[2. 2. 2. 2.]"]


def test_worker_pool(run_example):
    out, mode = run_example("worker_pool")
    assert "parent (pid" in out and ("daemon client" if mode == "daemon" else "embedded manager") in out
    assert "pool: row sums 524288 x 8; parent sees [2.0, 2.0, 2.0]" in out  # the workers wrote the parent's rows
    assert "executor: running total ends at 524288" in out
    assert "queue: consumed arrays [0, 1, 2, 3, 4]" in out
    assert "objects left: 0" in out
    assert out.rstrip().endswith("ok")
