"""`ugem serve --config FILE` and `--print-config` (SPEC §4 "Service conventions").

The file is TOML whose keys are the long names of the serve flags; flags given on the
command line override it; a typo or a bad value exits 2 with one line naming the key, the
value and what is allowed, and leaves nothing behind; `--print-config` prints TOML that
`--config` reads back to the same configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator

import pytest

from ugem.cli import build_parser
from ugem.serve_options import config_actions
from ugem.testing import run_daemon

UGEM = [sys.executable, "-m", "ugem"]
SAFETY = 120.0


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ugem-cfgfile-") as directory:
        yield directory


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UGEM, "serve", *args], capture_output=True, text=True, timeout=SAFETY)


def write(directory: str, text: str, name: str = "ugem.toml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def assert_bad_configuration(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ugem: "), result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])


def test_file_settings_apply_and_flags_override_them(workdir: str) -> None:
    config = write(workdir, 'system-budget = "48M"\nvram = 2097152\nhang-timeout = 2.5\nclient-max-objects = 7\n')
    with run_daemon(extra_args=("--config", config, "--vram", "3M")) as daemon, daemon.connect() as dev:
        figures = dev.stats()
        assert figures["system_budget"] == 48 << 20  # from the file
        assert figures["vram_size"] == 3 << 20  # the flag wins
        handles = [dev.create(4096) for _ in range(7)]
        with pytest.raises(OSError, match="limit is 7"):
            dev.create(4096)
        for handle in handles:
            dev.close_handle(handle)


def test_print_config_round_trips(workdir: str) -> None:
    spill = os.path.join(workdir, "spill")
    config = write(workdir, f'spill-dir = "{spill}"\nuid-quota = "unlimited"\nsocket-mode = 0o640\n'
                            f'stall-timeout = 5\nlog-level = "DEBUG"\nobject = ["w={config_path(workdir)}"]\n')
    first = serve("--config", config, "--pin-limit", "1G", "--exit-idle", "30", "--print-config")
    assert first.returncode == 0, first.stderr
    values = tomllib.loads(first.stdout)
    assert values["pin-limit"] == 1 << 30 and values["spill-dir"] == spill and values["uid-quota"] == "unlimited"
    assert values["socket-mode"] == "0640" and values["stall-timeout"] == 5.0 and values["exit-idle"] == 30.0
    assert values["log-level"] == "debug" and values["system-budget"] > 0 and values["client-quota"] == "unlimited"
    assert values["object"] == [f"w={config_path(workdir)}"]
    again = serve("--config", write(workdir, first.stdout, "printed.toml"), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert sorted(os.listdir(workdir)) == ["printed.toml", "ugem.toml", "weights.bin"]  # nothing was started


def config_path(directory: str) -> str:
    path = os.path.join(directory, "weights.bin")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(b"w" * 5000)
    return path


def test_every_serve_flag_is_a_key() -> None:
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    keys = {max(a.option_strings, key=len)[2:] for a in config_actions(serve_parser)}
    flags = {s[2:] for a in serve_parser._actions for s in a.option_strings if s.startswith("--")}
    assert keys == flags - {"help", "config", "print-config"}
    result = serve("--print-config")
    assert result.returncode == 0, result.stderr
    printed = {line.lstrip("# ").split(" ")[0].rstrip(":") for line in result.stdout.splitlines()[1:]}
    assert printed == keys


@pytest.mark.parametrize(("text", "named"), [
    ('sytem-budget = "4G"\n', ["sytem-budget", "'4G'", "system-budget"]),  # a typo: the known keys follow
    ('vram = 0\n', ["vram (in ", "'0'", "positive size"]),
    ('system-budget = true\n', ["system-budget (in ", "True", "a string or a number"]),
    ('spill-dir = 5\n', ["spill-dir (in ", "5", "a string"]),
    ('detach = "yes"\n', ["detach (in ", "'yes'", "true or false"]),
    ('object = "w=/etc/hostname"\n', ["object (in ", "a list of strings"]),
    ('object = ["nolabel"]\n', ["object (in ", "'nolabel'", "LABEL=PATH"]),
    ('socket-mode = "8"\n', ["socket-mode (in ", "'8'", "octal"]),
    ('log-level = "loud"\n', ["log-level (in ", "'loud'", "one of"]),
    ('config = "other.toml"\n', ["config", "not a setting"]),
    ('[table]\nvram = "1G"\n', ["table", "not a setting"]),
    ('vram = \n', ["--config", "not a valid TOML file"]),
])
def test_bad_file_exits_2_naming_key_and_value(workdir: str, text: str, named: list[str]) -> None:
    config = write(workdir, text)
    socket = os.path.join(workdir, "ugem.sock")
    result = serve("--config", config, "--socket", socket, "--spill-dir", os.path.join(workdir, "spill"))
    assert_bad_configuration(result, *named)
    assert os.listdir(workdir) == ["ugem.toml"], "a socket or spill directory was left behind"


def test_bad_value_in_file_is_fine_when_a_flag_overrides_it(workdir: str) -> None:
    config = write(workdir, 'vram = "lots"\n')
    result = serve("--config", config, "--vram", "2M", "--print-config")
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["vram"] == 2 << 20


def test_missing_config_file_exits_2(workdir: str) -> None:
    missing = os.path.join(workdir, "missing.toml")
    assert_bad_configuration(serve("--config", missing, "--socket", os.path.join(workdir, "s")), "--config",
                             repr(missing), "No such file")
    assert os.listdir(workdir) == []


def test_object_flags_replace_the_files_list(workdir: str) -> None:
    first, second = config_path(workdir), os.path.join(workdir, "second.bin")
    with open(second, "wb") as f:
        f.write(b"2" * 100)
    config = write(workdir, f'object = ["a={first}", "b={first}"]\n')
    from_file = tomllib.loads(serve("--config", config, "--print-config").stdout)
    assert from_file["object"] == [f"a={first}", f"b={first}"]
    overridden = tomllib.loads(serve("--config", config, "--object", f"c={second}", "--print-config").stdout)
    assert overridden["object"] == [f"c={second}"]
    with run_daemon(extra_args=("--config", config), object=[f"c={second}"]) as daemon, daemon.connect() as dev:
        assert [r["label"] for r in dev.list_objects()] == ["c"]
        handle, _ = dev.open_name(dev.lookup("c"))
        assert dev.pread(handle, 0, 100) == b"2" * 100
