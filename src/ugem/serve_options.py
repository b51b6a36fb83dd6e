"""The options of `ugem serve`: command-line flags, a TOML config file, the effective set.

Rules:
- every flag of the serve parser (its argparse actions) is also a config-file key, its
  long name without the dashes (`system-budget`), except --config and --print-config.
  Nothing here lists the flags: a flag added to the parser is a key at once;
- a file value's type follows the flag: a switch (`store_true`) takes true or false; a
  repeatable flag (`append`) a list of strings; any other flag a string, or a number where
  its METAVAR is a number (SIZE, N, SECONDS; for OCTAL an integer is the mode itself, so
  `0o640` and `"0640"` mean the same);
- the serve parser has no defaults (None: not given); a flag given on the command line
  wins over the file, a repeatable one's list replacing the file's whole list. The real
  defaults live in one place each: `Config` (the manager's keys) and `DAEMON_DEFAULTS`;
- any problem (the file unreadable or not TOML, an unknown key, a value of the wrong type
  or a bad value) is InvalidArgument naming the key as `key (in FILE)` (a flag as `--flag`),
  the value and what is allowed: `ugem serve` prints it as one line and exits 2 before
  creating anything;
- `effective_toml` renders the effective configuration as TOML that `--config` reads back
  to the same configuration: defaults resolved, sizes in bytes, "unlimited" for no limit,
  options with no value (and no default) as comments.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .config import UNLIMITED, Config, parse_seconds
from .errors import InvalidArgument

__all__ = ["DAEMON_DEFAULTS", "LOG_LEVELS", "ServeOptions", "config_actions", "effective_toml", "read_config_file",
           "serve_options", "size_text"]

LOG_LEVELS = ("debug", "info", "warning", "error")
DAEMON_DEFAULTS: dict[str, Any] = {"socket_mode": "0600", "log_level": "info", "log_format": "text",
                                   "stall_timeout": 30.0}
_NUMERIC = {"SIZE", "N", "SECONDS", "OCTAL"}  # metavars whose flags take a number in the file
_NOT_KEYS = {"help", "config", "print_config"}  # flags that are not configuration


@dataclass(frozen=True)
class ServeOptions:
    """The validated options of `ugem serve`."""

    config: Config
    stall_timeout: float
    exit_idle: float | None
    socket_mode: int
    log_level: str
    log_format: str
    metrics: str | None  # the --metrics address, checked for form only (bound by the service)


def size_text(n: int) -> str:
    """A size as its flag would take it: the largest binary unit that divides it (--help)."""
    for exponent, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        if n % (1 << (10 * exponent)) == 0:
            return f"{n >> (10 * exponent)}{unit}"
    return str(n)


def _key(action: argparse.Action) -> str:
    return action.dest.replace("_", "-")


def config_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The serve parser's flags that are configuration (config-file keys), in --help order."""
    return [a for a in parser._actions if a.option_strings and a.dest not in _NOT_KEYS]


def _file_value(action: argparse.Action, value: object, where: str) -> Any:
    """A config-file value as the command line would give it, or InvalidArgument."""
    def bad(allowed: str) -> InvalidArgument:
        return InvalidArgument(f"{_key(action)} (in {where}): {value!r} is not {allowed}")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise bad(f"a list of strings ({action.metavar})")
        return list(value)
    numeric = action.metavar in _NUMERIC
    if isinstance(value, str):
        return value
    if numeric and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#o}" if action.metavar == "OCTAL" else str(value)
    if numeric and isinstance(value, float) and action.metavar != "OCTAL":
        return repr(value)
    raise bad(f"a string or a number ({action.metavar})" if numeric else f"a string ({action.metavar})")


def read_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Fill `args` from the TOML file `args.config` where the command line gave nothing;
    returns dest -> how errors name it (`key (in FILE)` for what came from the file)."""
    names = {a.dest: max(a.option_strings, key=len) for a in config_actions(parser)}
    path = args.config
    if path is None:
        return names
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InvalidArgument(f"--config: {path!r} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"--config: {path!r} is not a valid TOML file: {exc}") from None
    actions = {_key(a): a for a in config_actions(parser)}
    for key, value in data.items():
        action = actions.get(key)
        if action is None:
            raise InvalidArgument(f"{key} (in {path}): {value!r} is set but {key!r} is not a setting of ugem serve; "
                                  f"the keys are {', '.join(actions)}")
        converted = _file_value(action, value, path)
        if getattr(args, action.dest) is None:  # not given on the command line
            setattr(args, action.dest, converted)
            names[action.dest] = f"{key} (in {path})"
    return names


def serve_options(args: argparse.Namespace, names: dict[str, str]) -> ServeOptions:
    """Validate the merged flags (InvalidArgument naming the flag or key, the value and
    what is allowed)."""
    def name(dest: str) -> str:
        return names.get(dest, "--" + dest.replace("_", "-"))

    def given(dest: str) -> Any:
        value = getattr(args, dest, None)
        return DAEMON_DEFAULTS.get(dest) if value is None else value

    config = Config.parse({f.name: getattr(args, f.name) for f in fields(Config)}, name=name)
    stall_timeout = parse_seconds(given("stall_timeout"), name("stall_timeout"))
    exit_idle = None if args.exit_idle is None else parse_seconds(args.exit_idle, name("exit_idle"))
    mode_text = given("socket_mode")
    try:
        socket_mode = int(mode_text, 8)
    except ValueError:
        socket_mode = -1
    if not 0 <= socket_mode <= 0o777:
        raise InvalidArgument(f"{name('socket_mode')}: {mode_text!r} is not an octal file mode from 0 to 0777")
    log_level = given("log_level")
    if log_level.lower() not in LOG_LEVELS:
        raise InvalidArgument(f"{name('log_level')}: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    from .daemon.service import check_service_flags

    log_format = given("log_format")
    check_service_flags(log_format, args.metrics, name)
    return ServeOptions(config, stall_timeout, exit_idle, socket_mode, log_level.lower(), log_format, args.metrics)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    # a JSON string is a TOML basic string, once DEL (a control character to TOML) is escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def effective_toml(parser: argparse.ArgumentParser, args: argparse.Namespace, options: ServeOptions,
                   default_socket: Callable[[], str]) -> str:
    """The effective configuration as TOML (`ugem serve --print-config`); flags with no
    value are comments, the default socket saying where it would be."""
    resolved: dict[str, Any] = {f.name: getattr(options.config, f.name) for f in fields(Config)}
    for key in ("client_quota", "uid_quota", "uid_max_clients"):
        if resolved[key] is None:
            resolved[key] = UNLIMITED
    resolved["object"] = [f"{label}={path}" for label, path in options.config.object]
    resolved.update(stall_timeout=options.stall_timeout, exit_idle=options.exit_idle,
                    socket_mode=f"{options.socket_mode:04o}", log_level=options.log_level)
    lines = ["# ugem serve: the effective configuration (read it back with --config FILE)"]
    for action in config_actions(parser):
        value = resolved.get(action.dest, getattr(args, action.dest, None))
        if isinstance(action, argparse._StoreTrueAction):
            value = bool(value)
        if value is None:
            unset = f"not set (the default: {default_socket()})" if action.dest == "socket" else "not set"
            lines.append(f"# {_key(action)}: {unset}")
        else:
            lines.append(f"{_key(action)} = {_toml(value)}")
    return "\n".join(lines) + "\n"
