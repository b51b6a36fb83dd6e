"""The daemon's log: `--log-level`, `--log-format text|json`, and named events.

Rules:
- everything goes to stderr through the `logging` module; `text` (the default) is one line
  per record, `TIME ugem[PID] LEVEL message`; `json` is one JSON object per line with
  `time` (UTC, ISO 8601), `level`, `event`, `message`, and the record's fields;
- a record about something that happened carries an event name and its fields through
  `event()`: `client`, `pid`, `uid` when a client is involved, `op` and `errno` (a name
  such as "EDQUOT") when a request is, and counts; the text format shows only the
  message, which says the same in words. Records logged without `event()` have the event
  `log`; a traceback is the field `traceback`;
- `Throttle` keeps a repeated event (one client's quota refusals) to one line per key
  and interval, counting what it held back.
The event names are listed in `EVENTS`; docs/REFERENCE.md describes each.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

__all__ = ["EVENTS", "LOG_FORMATS", "JsonFormatter", "Throttle", "event", "setup_logging"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s ugem[%(process)d] %(levelname)s %(message)s"
EVENTS = (
    "listening", "ready", "shutdown", "client_connect", "client_disconnect", "client_cleanup", "quota_refused",
    "protocol_violation", "handler_error", "reclaim", "memory_pressure", "metrics_listening", "log",
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "event"}


def event(logger: logging.Logger, level: int, name: str, message: str, *args: object, exc_info: bool = False,
          **fields: Any) -> None:
    """Log `message % args` as event `name` with `fields` (shown by the json format)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, exc_info=exc_info, extra={"event": name, **fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, log_format: str) -> None:
    """Log to stderr at `level` (debug, info, warning, error) in `log_format` (text, json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class Throttle:
    """At most one line per key each `interval` seconds; `allow` says how many were held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._seen: dict[object, tuple[float, int]] = {}  # key -> (when last let through, held back since)

    def allow(self, key: object, now: float) -> int | None:
        """None: hold this one back; else let it through, with the count held back before it."""
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0

    def expired(self, now: float) -> list[tuple[object, int]]:
        """Drop keys not let through for an interval; (key, count held back) for those
        that held some back since, for a last line."""
        gone = [(key, held) for key, (when, held) in self._seen.items() if now - when >= self.interval]
        for key, _ in gone:
            del self._seen[key]
        return [(key, held) for key, held in gone if held]
