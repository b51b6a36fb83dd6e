"""contrib/systemd: the example units stay in step with `ugem serve`.

Each service's ExecStart must parse and validate as `ugem serve` flags (bad configuration
would keep the unit from starting), run as Type=notify (the daemon sends READY=1), and
each socket must hand the daemon one stream socket named `ugem`.
"""

from __future__ import annotations

import configparser
import pathlib
import shlex

import pytest

from ugem import cli
from ugem.serve_options import read_config_file, serve_options

UNITS = pathlib.Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def _unit(path: pathlib.Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys as written
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("kind", ["user", "system"])
def test_service_runs_ugem_serve_with_valid_flags(kind: str) -> None:
    service = _unit(UNITS / kind / "ugem.service")
    assert service["Service"]["Type"] == "notify"
    assert service["Unit"]["Requires"] == "ugem.socket"
    argv = shlex.split(service["Service"]["ExecStart"].replace("%h", "/home/user"))
    assert argv[0].endswith("/ugem") and argv[1] == "serve"
    args = cli.build_parser().parse_args(argv[1:])
    serve_options(args, read_config_file(args.parser, args))  # InvalidArgument for a flag `ugem serve` refuses


@pytest.mark.parametrize("kind", ["user", "system"])
def test_socket_passes_one_stream_socket_named_ugem(kind: str) -> None:
    socket = _unit(UNITS / kind / "ugem.socket")["Socket"]
    assert socket["ListenStream"].endswith("/ugem/ugem.sock")
    assert socket["FileDescriptorName"] == "ugem"
