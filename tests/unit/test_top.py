"""ugem.top: frames rendered headless at a fixed size from hand-made `stats()` samples.

Checks the screen text: region figures (with bars and percentages against the budget and
the VRAM size), rates computed from two samples, client rows sorted by resident bytes, the client
table cut to the lines that fit (its last row summing up the rest), and `run` in both modes
with a fake device.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from rich.console import Console

import ugem
from ugem.top import Rates, human, render, run

# test_exports checks ugem's public names against a list of tolerated submodules; importing
# ugem.top binds `ugem.top`, so unbind it (the module stays in sys.modules).
vars(ugem).pop("top", None)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
WIDTH, HEIGHT = 100, 30


def client(cid: int, resident: int, *, pid: int | None = None, uid: int = 1000, objects: int = 1,
           pinned: int = 0, size: int | None = None) -> dict[str, Any]:
    """A per-client row; `size` (its `bytes`, sizes of what it created) defaults to 2 * resident."""
    return {"id": cid, "pid": 4000 + cid if pid is None else pid, "uid": uid, "objects": objects,
            "bytes": 2 * resident if size is None else size, "resident_bytes": resident, "pinned_bytes": pinned}


def sample(**figures: Any) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "objects": 5, "clients": 2, "resident_bytes": 48 * KiB, "system_budget": 64 * KiB,
        "vram_bytes": 256 * MiB, "vram_size": 1 * GiB, "spilled_bytes": 32 * KiB, "pinned_bytes": 8 * KiB,
        "purgeable_bytes": 4 * KiB, "purged_total": 1, "evicted_total": 10, "spilled_total": 3,
        "bytes_moved_total": 1 * MiB,
        "per_client": [client(1, 12 * KiB, objects=3), client(2, 80 * KiB, objects=2, pinned=8 * KiB)],
    }
    stats.update(figures)
    return stats


def screen(renderable: Any, width: int = WIDTH, height: int = HEIGHT) -> str:
    console = Console(record=True, width=width, height=height, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def row(text: str, label: str) -> str:
    """The screen line whose first cell (after an optional panel border) is `label`."""
    lines = [line for line in text.splitlines() if re.match(rf"^[│|]? ?{re.escape(label)}\b", line)]
    assert len(lines) == 1, f"{label!r} in:\n{text}"
    return lines[0]


def cells(text: str, label: str) -> list[str]:
    """The words of the panel line (either panel) that starts with `label`."""
    found = [part.split() for line in text.splitlines() for part in line.split("│")
             if part.split()[:1] == [label]]
    assert len(found) == 1, f"{label!r} in:\n{text}"
    return found[0]


def client_rows(text: str) -> list[list[str]]:
    """The client table's data rows as cells (lines starting with a number)."""
    return [line.split() for line in text.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\d+\s+\d+\s", line)]


# -- units ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                         (64 * MiB, "64.0 MiB"), (3 * GiB // 2, "1.5 GiB"), (5 << 40, "5.0 TiB"),
                                         (2048 << 50, "2048.0 PiB")])
def test_human_uses_binary_units(n: int, text: str) -> None:
    assert human(n) == text


# -- rates ---------------------------------------------------------------------------


def test_rates_are_counter_increases_per_second() -> None:
    before = sample()
    after = sample(evicted_total=30, spilled_total=7, purged_total=1, bytes_moved_total=1 * MiB + 8 * MiB)
    assert Rates.between(before, after, 2.0) == Rates(evictions=10.0, spills=2.0, purges=0.0,
                                                      bytes_moved=4.0 * MiB)


def test_rates_need_two_samples_some_time_apart() -> None:
    assert Rates.between(None, sample(), 1.0) is None
    assert Rates.between(sample(), sample(), 0.0) is None


def test_a_counter_that_went_down_counts_as_no_events() -> None:
    rates = Rates.between(sample(evicted_total=50), sample(evicted_total=3), 1.0)
    assert rates is not None and rates.evictions == 0.0


# -- regions -------------------------------------------------------------------------


def test_regions_show_usage_against_the_limits() -> None:
    text = screen(render(sample(), None, 0.0))
    system = row(text, "system")
    assert "48.0 KiB / 64.0 KiB" in system and "75.0%" in system
    assert "█" * 12 + "░" * 4 in system  # a 16-cell bar, three quarters full
    vram = row(text, "VRAM")
    assert "256.0 MiB / 1.0 GiB" in vram and "25.0%" in vram and "█" * 4 + "░" * 12 in vram
    assert "32.0 KiB" in row(text, "spilled")
    assert "8.0 KiB" in row(text, "pinned")
    assert "4.0 KiB" in row(text, "purgeable")
    assert text.splitlines()[0].startswith("ugem top  5 objects, 2 clients")


def test_over_budget_shows_a_full_bar_and_the_true_percentage() -> None:
    system = row(screen(render(sample(resident_bytes=96 * KiB), None, 0.0)), "system")
    assert "96.0 KiB / 64.0 KiB" in system and "150.0%" in system and "█" * 16 in system


def test_a_sliver_in_use_shows_one_cell_and_nothing_shows_none() -> None:
    text = screen(render(sample(resident_bytes=0, vram_bytes=4 * KiB), None, 0.0))
    assert "░" * 16 in row(text, "system") and "0.0%" in row(text, "system")
    assert "█" + "░" * 15 in row(text, "VRAM") and "0.0%" in row(text, "VRAM")


def test_a_daemon_without_limits_in_its_stats_shows_figures_without_bars() -> None:
    stats = sample()
    del stats["system_budget"], stats["vram_size"]
    text = screen(render(stats, None, 0.0))
    assert "48.0 KiB" in row(text, "system") and "%" not in row(text, "system")
    assert "256.0 MiB" in row(text, "VRAM") and "█" not in text and "░" not in text


def test_the_header_says_whether_the_device_is_suspended() -> None:
    assert "device" not in screen(render(sample(), None, 0.0)).splitlines()[0]  # a daemon that does not say
    running = screen(render(sample(suspended=False), None, 0.0)).splitlines()[0]
    assert running.startswith("ugem top  5 objects, 2 clients  device: running  rates: first sample"), running
    suspended = screen(render(sample(suspended=True), None, 0.0)).splitlines()[0]
    assert suspended.startswith("ugem top  5 objects, 2 clients  device: SUSPENDED  rates:"), suspended


def test_narrow_consoles_stack_the_panels() -> None:
    wide, narrow = screen(render(sample(), None, 0.0)), screen(render(sample(), None, 0.0), width=80)
    tops = [line for line in wide.splitlines() if line.startswith("╭─")]
    assert len(tops) == 1 and "regions" in tops[0] and "rates" in tops[0]  # side by side
    assert all(len(line) <= 80 for line in narrow.splitlines())
    tops = [line for line in narrow.splitlines() if line.startswith("╭─")]
    assert len(tops) == 2 and "regions" in tops[0] and "rates" in tops[1]  # one above the other


# -- rates on screen -----------------------------------------------------------------


def test_first_frame_has_totals_but_no_rates() -> None:
    text = screen(render(sample(), None, 0.0))
    assert "rates: first sample" in text.splitlines()[0]
    assert cells(text, "evictions") == ["evictions", "-", "10"]
    assert cells(text, "moved") == ["moved", "-", "1.0", "MiB"]


def test_rates_between_two_samples_on_screen() -> None:
    before = sample()
    after = sample(evicted_total=16, spilled_total=5, purged_total=2, bytes_moved_total=3 * MiB)
    text = screen(render(after, before, 2.0))
    assert "rates over 2.0 s" in text.splitlines()[0]
    rates = {label: cells(text, label) for label in ("evictions", "spills", "purges", "moved")}
    assert rates == {"evictions": ["evictions", "3.0", "16"], "spills": ["spills", "1.0", "5"],
                     "purges": ["purges", "0.5", "2"], "moved": ["moved", "1.0", "MiB", "3.0", "MiB"]}


# -- clients -------------------------------------------------------------------------


def test_clients_are_listed_by_resident_bytes() -> None:
    stats = sample(per_client=[client(1, 12 * KiB, objects=3), client(2, 80 * KiB, objects=2, pinned=8 * KiB),
                               client(3, 0, pid=777, uid=0, objects=0, size=1 * GiB), client(4, 12 * KiB)])
    text = screen(render(stats, None, 0.0))
    assert "clients (4, by resident memory)" in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("ID"))
    assert header.split() == ["ID", "PID", "UID", "OBJECTS", "RESIDENT", "SIZE", "PINNED"]
    # the biggest creator (1 GiB, nothing written) comes last: what counts is memory held
    assert client_rows(text) == [["2", "4002", "1000", "2", "80.0", "KiB", "160.0", "KiB", "8.0", "KiB"],
                                 ["1", "4001", "1000", "3", "12.0", "KiB", "24.0", "KiB", "0", "B"],
                                 ["4", "4004", "1000", "1", "12.0", "KiB", "24.0", "KiB", "0", "B"],
                                 ["3", "777", "0", "0", "0", "B", "1.0", "GiB", "0", "B"]]


def test_many_clients_are_cut_to_the_rows_that_fit() -> None:
    many = [client(i, i * KiB, objects=i, pinned=KiB if i % 2 else 0) for i in range(1, 61)]
    text = screen(render(sample(clients=60, per_client=many), None, 0.0))
    lines = text.rstrip("\n").splitlines()
    assert len(lines) == HEIGHT, text
    shown = client_rows(text)
    assert 5 < len(shown) < 60
    assert [int(r[0]) for r in shown] == list(range(60, 60 - len(shown), -1))  # the biggest ones
    assert f"clients (top {len(shown)} of 60, by resident memory)" in text
    hidden = range(1, 61 - len(shown))
    summary = lines[-1].split()
    assert summary[:2] == [f"+{len(hidden)}", "more"]
    assert summary[2] == str(sum(hidden))  # objects
    assert " ".join(summary[3:5]) == human(sum(hidden) * KiB)  # resident
    assert " ".join(summary[5:7]) == human(2 * sum(hidden) * KiB)  # size
    assert " ".join(summary[7:9]) == human(sum(KiB for i in hidden if i % 2))
    # a taller console shows them all
    tall = screen(render(sample(clients=60, per_client=many), None, 0.0), height=100)
    assert len(client_rows(tall)) == 60 and "more" not in tall


def test_a_tiny_console_says_how_many_clients_there_are() -> None:
    text = screen(render(sample(), None, 0.0), height=10)
    assert "2 clients (no room to list them)" in text and not client_rows(text)


# -- run -----------------------------------------------------------------------------


class FakeDevice:
    """Hands out the given samples; past them, raises KeyboardInterrupt (the user's Ctrl-C)."""

    def __init__(self, *samples: dict[str, Any]) -> None:
        self.samples = list(samples)
        self.calls = 0

    def stats(self) -> dict[str, Any]:
        self.calls += 1
        if not self.samples:
            raise KeyboardInterrupt
        return self.samples.pop(0)


def test_once_prints_one_frame() -> None:
    console = Console(record=True, width=WIDTH, height=HEIGHT, force_terminal=False)
    dev = FakeDevice(sample(), sample())
    assert run(dev, 1.0, True, console) == 0
    text = console.export_text()
    assert dev.calls == 1 and text.count("ugem top") == 1 and "rates: first sample" in text


def test_live_mode_redraws_until_ctrl_c() -> None:
    console = Console(record=True, width=WIDTH, height=HEIGHT, force_terminal=True, color_system=None)
    dev = FakeDevice(sample(), sample(evicted_total=11), sample(evicted_total=13))
    assert run(dev, 0.01, False, console) == 0
    text = console.export_text()
    assert dev.calls == 4
    assert "rates: first sample" in text and "rates over" in text and text.count("ugem top") >= 3
