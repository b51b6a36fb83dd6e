"""daemon/logs.py: the JSON line format and the throttle."""

from __future__ import annotations

import json
import logging

from ugem.daemon.logs import JsonFormatter, Throttle


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("ugem.daemon", logging.WARNING, __file__, 1, "client %d: %s", (3, "x"), None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_time_level_event_message_and_fields() -> None:
    line = JsonFormatter().format(_record(event="quota_refused", client=3, pid=10, uid=1000, op="GEM_CREATE",
                                          errno="EDQUOT"))
    entry = json.loads(line)
    assert entry.pop("time").endswith("Z")
    assert entry == {"level": "warning", "event": "quota_refused", "message": "client 3: x", "client": 3, "pid": 10,
                     "uid": 1000, "op": "GEM_CREATE", "errno": "EDQUOT"}
    assert "\n" not in line


def test_a_record_without_an_event_is_event_log_with_its_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record()
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["event"] == "log" and "ValueError: boom" in entry["traceback"]


def test_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    throttle = Throttle(5.0)
    assert throttle.allow("a", 0.0) == 0
    assert throttle.allow("a", 1.0) is None and throttle.allow("a", 2.0) is None
    assert throttle.allow("b", 2.0) == 0  # keys are independent
    assert throttle.allow("a", 5.0) == 2  # through again, with the two held back
    assert throttle.allow("a", 6.0) is None
    assert throttle.expired(9.0) == []  # "a" was let through at 5.0: not quiet for an interval yet
    assert throttle.expired(10.0) == [("a", 1)]  # "b" expired too, having held nothing back
    assert throttle.allow("a", 10.5) == 0
