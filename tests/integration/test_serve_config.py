"""Bad configuration (SPEC §4 "Service conventions") and `ugem --version`.

`ugem serve` with an unparsable, negative, zero, NaN or infinite value, a socket mode
outside 0-0777, a spill dir that is not a directory, or a socket path it cannot use exits
2 with one line on stderr naming the flag and the value (and what is allowed), shows no
traceback and leaves nothing behind: no socket, no lock file, no spill directory. The
embedded `ugem.Manager(**config)` rejects the same values with EINVAL naming the key.
"""

from __future__ import annotations

import contextlib
import errno
import io
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
import ugem.cli
import ugem.daemon.listener
import ugem.daemon.server  # noqa: F401  (forked children cannot import it as uid 65534)

UGEM = [sys.executable, "-m", "ugem"]
SAFETY = 120.0

BAD_VALUES = [
    ("--vram", "0"), ("--vram", "-1G"), ("--vram", "abc"), ("--vram", "65T"), ("--vram", "nan"),
    ("--system-budget", "0"), ("--system-budget", "inf"), ("--system-budget", "1e400"),
    ("--pin-limit", "1e400"), ("--pin-limit", "0"), ("--client-quota", "0"), ("--client-quota", "-4K"),
    ("--uid-quota", "0"), ("--uid-quota", "lots"),
    ("--client-max-objects", "0"), ("--client-max-objects", "1.5"), ("--client-max-objects", "many"),
    ("--uid-max-clients", "-3"), ("--uid-max-clients", "0"),
    ("--hang-timeout", "nan"), ("--hang-timeout", "0"), ("--hang-timeout", "inf"), ("--hang-timeout", "-1"),
    ("--stall-timeout", "0"), ("--stall-timeout", "soon"), ("--stall-timeout", "nan"),
    ("--exit-idle", "0"), ("--exit-idle", "-1"), ("--exit-idle", "nan"), ("--exit-idle", "inf"),
    ("--exit-idle", "never"),
    ("--socket-mode", "abc"), ("--socket-mode", "7777"), ("--socket-mode", "1000"), ("--socket-mode", "-1"),
    ("--socket-mode", "8"), ("--log-level", "loud"),
]
KEYS = {"--vram": "vram", "--system-budget": "system_budget", "--pin-limit": "pin_limit",
        "--client-quota": "client_quota", "--uid-quota": "uid_quota", "--client-max-objects": "client_max_objects",
        "--uid-max-clients": "uid_max_clients", "--hang-timeout": "hang_timeout"}


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ugem-conf-") as directory:
        yield directory


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UGEM, "serve", *args], capture_output=True, text=True, timeout=SAFETY, env=env)


def assert_bad_configuration(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ugem: "), result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_value_exits_2_naming_flag_and_value(workdir: str, flag: str, value: str) -> None:
    result = serve("--socket", os.path.join(workdir, "ugem.sock"), "--spill-dir", os.path.join(workdir, "spill"),
                   f"{flag}={value}")
    assert_bad_configuration(result, flag, repr(value))
    assert re.search(r"is not (a|an|one of) ", result.stderr), result.stderr  # and what is allowed
    assert os.listdir(workdir) == []


def test_bad_value_with_detach_exits_2_before_detaching(workdir: str) -> None:
    result = serve("--detach", "--socket", os.path.join(workdir, "ugem.sock"), "--exit-idle", "0")
    assert_bad_configuration(result, "--exit-idle", "'0'")
    assert os.listdir(workdir) == []


def test_spill_dir_that_is_a_file(workdir: str) -> None:
    spill = os.path.join(workdir, "spill")
    with open(spill, "w") as f:
        f.write("not a directory")
    result = serve("--socket", os.path.join(workdir, "ugem.sock"), "--spill-dir", spill)
    assert_bad_configuration(result, "--spill-dir", repr(spill), "not a directory")
    assert os.listdir(workdir) == ["spill"]


def test_spill_dir_that_cannot_be_made_leaves_no_socket(workdir: str) -> None:
    blocker = os.path.join(workdir, "file")
    with open(blocker, "w"):
        pass
    spill = os.path.join(blocker, "spill")
    result = serve("--socket", os.path.join(workdir, "ugem.sock"), "--spill-dir", spill)
    assert_bad_configuration(result, "--spill-dir", repr(spill))
    assert os.listdir(workdir) == ["file"], "the socket or its lock was left behind"


@pytest.mark.parametrize("case", ["missing-dir", "dir-is-a-file", "too-long"])
def test_socket_that_cannot_be_used(workdir: str, case: str) -> None:
    if case == "missing-dir":
        path = os.path.join(workdir, "missing", "ugem.sock")
    elif case == "dir-is-a-file":
        with open(os.path.join(workdir, "file"), "w"):
            pass
        path = os.path.join(workdir, "file", "ugem.sock")
    else:
        path = os.path.join(workdir, "x" * 120 + ".sock")
    spill = os.path.join(workdir, "spill")
    result = serve("--socket", path, "--spill-dir", spill)
    assert_bad_configuration(result, "--socket", repr(path))
    assert sorted(os.listdir(workdir)) == (["file"] if case == "dir-is-a-file" else []), "something was left behind"


def test_default_socket_whose_directory_cannot_be_made(workdir: str) -> None:
    runtime = os.path.join(workdir, "runtime")
    with open(runtime, "w"):
        pass
    env = {k: v for k, v in os.environ.items() if k != "UGEM_SOCKET"}
    env["XDG_RUNTIME_DIR"] = runtime
    result = serve("--spill-dir", os.path.join(workdir, "spill"), env=env)
    assert_bad_configuration(result, "--socket (default)", os.path.join(runtime, "ugem", "ugem.sock"))
    assert os.listdir(workdir) == ["runtime"]


def test_good_values_still_start(workdir: str) -> None:
    from ugem.testing import run_daemon

    with run_daemon(socket=os.path.join(workdir, "ugem.sock"), vram="1.5M", system_budget="64MiB",
                    client_quota="unlimited", uid_quota="unlimited", uid_max_clients="unlimited",
                    client_max_objects=10, hang_timeout="0.5", stall_timeout="2.5", socket_mode="0o640",
                    exit_idle="600") as daemon:
        with daemon.connect() as dev:
            assert dev.stats()["system_budget"] == 64 << 20
            assert dev.stats()["vram_size"] == 3 << 19


# -- the embedded manager: same values, EINVAL naming the key -------------------------------

@pytest.mark.parametrize(("flag", "value"), [(f, v) for f, v in BAD_VALUES if f in KEYS],
                         ids=[f"{KEYS[f]}={v}" for f, v in BAD_VALUES if f in KEYS])
def test_manager_rejects_the_same_values(workdir: str, flag: str, value: str) -> None:
    key = KEYS[flag]
    with pytest.raises(ugem.InvalidArgument) as exc:
        ugem.Manager(spill_dir=os.path.join(workdir, "spill"), **{key: value})
    assert exc.value.errno == errno.EINVAL
    assert f"{key}: {value!r}" in str(exc.value.strerror), exc.value.strerror
    assert os.listdir(workdir) == []


@pytest.mark.parametrize(("key", "value"), [("vram", 0), ("system_budget", True), ("pin_limit", 1.5),
                                            ("hang_timeout", float("nan")), ("hang_timeout", float("inf")),
                                            ("client_max_objects", -1), ("spill_dir", ""), ("bogus", 1)])
def test_manager_rejects_bad_python_values(workdir: str, key: str, value: Any) -> None:
    config = {"spill_dir": os.path.join(workdir, "spill"), key: value}
    with pytest.raises(ugem.InvalidArgument) as exc:
        ugem.Manager(**config)
    assert key in str(exc.value.strerror), exc.value.strerror


def test_manager_spill_dir_that_is_a_file(workdir: str) -> None:
    spill = os.path.join(workdir, "spill")
    with open(spill, "w"):
        pass
    with pytest.raises(ugem.InvalidArgument, match="spill_dir: .* is not a directory"):
        ugem.Manager(spill_dir=spill)


# -- ugem --version ----------------------------------------------------------------------------

def test_version() -> None:
    from importlib.metadata import version

    result = subprocess.run([*UGEM, "--version"], capture_output=True, text=True, timeout=SAFETY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ugem {ugem.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", ugem.__version__)
    assert ugem.__version__ == version("ugem")


# -- not permitted (uid 65534) ---------------------------------------------------------------

def _serve_in_process(channel: Connection, argv: list[str], env: dict[str, str]) -> None:
    """`ugem serve` as this uid, in this (forked) process: send (exit status, output)."""
    os.environ.clear()
    os.environ.update(env)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = ugem.cli.main(["serve", *argv])
        except BaseException:
            import traceback

            traceback.print_exc()
            status = -1
    channel.send((status, out.getvalue()))


@pytest.mark.parametrize("case", ["socket-dir", "socket-path", "default-socket-dir", "default-spill-dir"])
def test_not_permitted_names_the_path(kit: Any, case: str) -> None:
    locked = kit.open_dir()  # root's, 0755: uid 65534 may search it, not write it
    writable = kit.open_dir()
    os.chmod(writable, 0o777)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": locked}
    argv = ["--spill-dir", os.path.join(writable, "spill")]
    if case == "socket-dir":  # a directory it cannot even look at
        os.mkdir(os.path.join(locked, "private"), 0o700)
        os.mkdir(os.path.join(locked, "private", "inner"))
        path = os.path.join(locked, "private", "inner", "ugem.sock")
        argv += ["--socket", path]
        named = ["--socket", path, os.path.join(locked, "private", "inner")]
    elif case == "socket-path":
        path = os.path.join(locked, "ugem.sock")
        argv += ["--socket", path]
        named = ["--socket", path]
    elif case == "default-socket-dir":
        env["XDG_RUNTIME_DIR"] = locked
        path = os.path.join(locked, "ugem", "ugem.sock")
        named = ["--socket (default)", path, os.path.join(locked, "ugem")]
    else:
        path = os.path.join(writable, "ugem.sock")
        argv = ["--socket", path]  # spill dir by default: $HOME/.cache/ugem/spill
        named = ["--spill-dir", os.path.join(locked, ".cache", "ugem", "spill")]
    child = kit.tenant(_serve_in_process, argv, env)
    status, output = child.recv(SAFETY)
    assert (status, "Traceback" in output) == (2, False), output
    assert len(output.splitlines()) == 1, output
    for text in named:
        assert text in output, (text, output)
    assert "ermission denied" in output, output
    assert os.listdir(locked) == (["private"] if case == "socket-dir" else []), "something was left behind"
    assert os.listdir(writable) == [], "something was left behind"
    assert child.join(SAFETY) == 0
