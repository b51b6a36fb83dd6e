"""`ugem top`: a live view of the manager's memory regions, event rates and clients (SPEC §4).

Rules:

- `render(stats, previous, elapsed)` is pure: it turns one `stats()` sample (and optionally the
  sample taken `elapsed` seconds before it) into a rich renderable and does no I/O. The frame
  fits itself to the console it is drawn on, at draw time: the client table gets the lines the
  header and the region/rate panels leave, so a resize needs no new sample.
- Regions: system is `resident_bytes` against `system_budget`, VRAM is `vram_bytes` against
  `vram_size`, each with a bar and a percentage (the bar is clamped at full, the percentage is
  not: resident memory may exceed the budget while the shrinker catches up; any use at all
  shows at least one cell). A daemon whose
  stats lack a limit shows the figure without a bar. Spilled, pinned and purgeable are plain
  byte figures. Bytes are shown in binary units (B, KiB, MiB, GiB, TiB).
- The header counts objects and clients and, when the stats carry `suspended`, says
  `device: running` or `device: SUSPENDED` (device work is held until `ugem resume`).
- Rates (`Rates.between`) are the `*_total` counters' increase between two samples divided by
  the seconds between them; without a previous sample, or when no time passed, they show as
  "-". A counter that went down (another daemon on the socket) counts as no events.
- Clients are sorted by `resident_bytes` (system memory their objects really hold), then
  `id`; the table shows OBJECTS (handles held), RESIDENT, SIZE (`bytes`: sizes of the objects
  the client created) and PINNED, as many rows as fit; when some do not, its last row says
  how many more there are and what they hold together.
- `run(dev, interval, once, console)` samples `dev.stats()`: `once` prints one frame and
  returns; otherwise a rich `Live` display redraws every `interval` seconds until Ctrl-C, which
  returns 0 (the last frame stays on screen). In the main thread Ctrl-C only sets a flag the
  loop reads between samples: a KeyboardInterrupt raised inside a request or a redraw could
  leave the connection or the display's locks half-way, and the exit hung (seen in a
  loaded test run). On a non-terminal, rich shows only the last frame.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

__all__ = ["Frame", "Rates", "StatsSource", "human", "render", "run"]

Stats = Mapping[str, Any]
BAR_WIDTH = 16
SIDE_BY_SIDE_WIDTH = 96  # below this the rates panel goes under the regions panel
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_COUNTERS = (("evictions", "evicted_total"), ("spills", "spilled_total"), ("purges", "purged_total"),
             ("bytes_moved", "bytes_moved_total"))
_CLIENT_BYTES = (("RESIDENT", "resident_bytes"), ("SIZE", "bytes"), ("PINNED", "pinned_bytes"))  # columns


def human(n: float) -> str:
    """Bytes in binary units: `512 B`, `4.0 KiB`, `1.5 GiB`."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in _UNITS:
        n /= 1024
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Rates:
    """Events per second between two `stats()` samples."""

    evictions: float
    spills: float
    purges: float
    bytes_moved: float

    @classmethod
    def between(cls, previous: Stats | None, current: Stats, elapsed: float) -> Rates | None:
        """The rates from `previous` to `current`, taken `elapsed` seconds apart; None without both."""
        if previous is None or elapsed <= 0:
            return None
        per_second = [max(0, int(current.get(key, 0)) - int(previous.get(key, 0))) / elapsed
                      for _, key in _COUNTERS]
        return cls(*per_second)


class StatsSource(Protocol):
    """What `run` needs of a Device."""

    def stats(self) -> dict[str, Any]: ...


def _count(stats: Stats, key: str, noun: str) -> str:
    n = int(stats.get(key, 0))
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bar(used: int, limit: int, ascii_only: bool) -> Text:
    filled = min(BAR_WIDTH, round(BAR_WIDTH * used / limit)) if limit > 0 else 0
    filled = max(filled, 1 if used > 0 else 0)  # a sliver in use still shows
    full, empty = ("#", "-") if ascii_only else ("█", "░")
    style = "green" if used < 0.75 * limit else "yellow" if used <= limit else "bold red"
    bar = Text(full * filled, style=style)
    bar.append(empty * (BAR_WIDTH - filled), style="bright_black")
    return bar


def _regions(stats: Stats, ascii_only: bool) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column("region", style="bold", min_width=9)
    grid.add_column("used", justify="right", min_width=9)
    grid.add_column("limit", min_width=10)
    grid.add_column("bar", width=BAR_WIDTH)
    grid.add_column("percent", justify="right", min_width=6)
    for label, used_key, limit_key in (("system", "resident_bytes", "system_budget"),
                                       ("VRAM", "vram_bytes", "vram_size")):
        used, limit = int(stats.get(used_key, 0)), int(stats.get(limit_key, 0))
        if limit > 0:
            grid.add_row(label, human(used), f"/ {human(limit)}", _bar(used, limit, ascii_only),
                         f"{100 * used / limit:.1f}%")
        else:
            grid.add_row(label, human(used), "", "", "")
    for label, key in (("spilled", "spilled_bytes"), ("pinned", "pinned_bytes"), ("purgeable", "purgeable_bytes")):
        grid.add_row(label, human(int(stats.get(key, 0))), "", "", "")
    return grid


def _rates(stats: Stats, rates: Rates | None) -> Table:
    grid = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="dim")
    grid.add_column("", style="bold", min_width=9)
    grid.add_column("per s", justify="right", min_width=9)
    grid.add_column("total", justify="right", min_width=9)
    for (name, key), label in zip(_COUNTERS, ("evictions", "spills", "purges", "moved"), strict=True):
        total, rate = int(stats.get(key, 0)), None if rates is None else float(getattr(rates, name))
        if name == "bytes_moved":
            grid.add_row(label, "-" if rate is None else human(rate), human(total))
        else:
            grid.add_row(label, "-" if rate is None else f"{rate:.1f}", str(total))
    return grid


def _sorted_clients(stats: Stats) -> list[Mapping[str, Any]]:
    clients: Iterable[Mapping[str, Any]] = stats.get("per_client", ())
    return sorted(clients, key=lambda c: (-int(c.get("resident_bytes", 0)), int(c.get("id", 0))))


def _client_table(rows: list[Mapping[str, Any]], hidden: list[Mapping[str, Any]], total: int) -> Table:
    shown = f"top {len(rows)} of {total}" if hidden else f"{total}"
    table = Table(title=f"clients ({shown}, by resident memory)", title_justify="left", title_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    for name in ("ID", "PID", "UID", "OBJECTS"):
        table.add_column(name, justify="right", no_wrap=True, min_width=5)
    for name, _ in _CLIENT_BYTES:
        table.add_column(name, justify="right", no_wrap=True, min_width=8)
    for c in rows:
        table.add_row(str(c.get("id", "")), str(c.get("pid", "")), str(c.get("uid", "")), str(c.get("objects", 0)),
                      *(human(int(c.get(key, 0))) for _, key in _CLIENT_BYTES))
    if hidden:
        table.add_row(f"+{len(hidden)} more", "", "", str(sum(int(c.get("objects", 0)) for c in hidden)),
                      *(human(sum(int(c.get(key, 0)) for c in hidden)) for _, key in _CLIENT_BYTES),
                      style="italic")
    return table


@dataclass(frozen=True)
class Frame:
    """One screen of `ugem top`; lays itself out for the console options it is rendered with."""

    stats: Stats
    rates: Rates | None
    elapsed: float

    def header(self) -> Text:
        text = Text("ugem top", style="bold")
        text.append(f"  {_count(self.stats, 'objects', 'object')}, {_count(self.stats, 'clients', 'client')}  ")
        if "suspended" in self.stats:
            if self.stats["suspended"]:
                text.append("device: SUSPENDED", style="bold reverse red")
            else:
                text.append("device: running", style="green")
            text.append("  ")
        text.append("rates: first sample" if self.rates is None else f"rates over {self.elapsed:.1f} s",
                    style="dim")
        return text

    def panels(self, options: ConsoleOptions) -> RenderableType:
        regions = Panel(_regions(self.stats, options.ascii_only), title="regions", title_align="left",
                        box=box.ROUNDED, expand=False)
        rates = Panel(_rates(self.stats, self.rates), title="rates", title_align="left",
                      box=box.ROUNDED, expand=False)
        if options.max_width < SIDE_BY_SIDE_WIDTH:
            return Group(regions, rates)
        row = Table.grid(padding=(0, 1))
        row.add_row(regions, rates)
        return row

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        head = Group(self.header(), self.panels(options))
        unbounded = options.update(height=None)
        budget = (options.height if options.height is not None else options.max_height)
        budget -= len(console.render_lines(head, unbounded, pad=False))
        yield head
        clients = _sorted_clients(self.stats)
        overhead = len(console.render_lines(_client_table([], [], len(clients)), unbounded, pad=False))
        room = budget - overhead  # table rows that fit
        if room >= len(clients):
            yield _client_table(clients, [], len(clients))
        elif room >= 2:
            yield _client_table(clients[:room - 1], clients[room - 1:], len(clients))
        elif budget >= 1:
            yield Text(f"{len(clients)} clients (no room to list them)", style="dim")


def render(stats: Stats, previous: Stats | None, elapsed: float) -> Frame:
    """The frame for sample `stats`, with rates against `previous` taken `elapsed` seconds earlier."""
    return Frame(stats, Rates.between(previous, stats, elapsed), elapsed)


def run(dev: StatsSource, interval: float, once: bool, console: Console) -> int:
    """Show `dev`'s figures: one frame if `once`, else redraw every `interval` s until Ctrl-C. Returns 0."""
    stats, taken = dev.stats(), time.monotonic()
    if once:
        console.print(render(stats, None, 0.0))
        return 0
    stop = threading.Event()  # Ctrl-C ends the loop between samples, never inside a request or a redraw
    handled = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if handled else None
    try:
        with Live(render(stats, None, 0.0), console=console, auto_refresh=True, refresh_per_second=4,
                  vertical_overflow="crop", redirect_stdout=False, redirect_stderr=False) as live:
            while not stop.wait(interval):
                current, now = dev.stats(), time.monotonic()
                live.update(render(current, stats, now - taken), refresh=True)
                stats, taken = current, now
    except KeyboardInterrupt:  # (a Ctrl-C before the handler was set, or a source that raises it)
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0
