"""Render bench results (the JSON of `run_all.py --json PATH`) as PNG plots and a markdown page.

    python tools/render.py results.json [--out DIR] [--markdown PATH]
    python bench/run_all.py --render DIR [--markdown PATH]     (run, then render)

Defaults: PNGs into docs/perf/, markdown to docs/PERFORMANCE.md (both under the repository root).

Per bench, one PNG (`<bench>.png`): horizontal bars of every ratio against the baseline measured
in the same run, with the target (docs/REFERENCE.md, "Performance targets") drawn as a vertical
line on the rows that have one, then one panel per unit of the medians, with whiskers out to the p99 (for GB/s and other
rates, the p99 is the rate of the slowest 1% sample, so its whisker points left).

The markdown is a function of the JSON only: its one date is the run's (from the JSON), so that
rendering the same results twice gives the same file and re-runs diff meaningfully. Without
matplotlib the markdown is still written (saying the plots were skipped) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "perf")
DEFAULT_MARKDOWN = os.path.join(ROOT, "docs", "PERFORMANCE.md")
INSTALL_HINT = "python3 -m pip install -e '.[bench]'  (or: python3 -m pip install matplotlib)"

Log = Callable[[str], None]

# -- small helpers ------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> str:
    """The number formatting of the bench tables (_harness._num); '-' when not a number."""
    if not _finite(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _verdict(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "ERROR"
    if row.get("target") is None:
        return ""
    passed = row.get("passed")
    return "PASS" if passed else ("FAIL" if passed is False else "n/a")


def _label(row: dict[str, Any]) -> str:
    """Figure label; an indented figure (a detail of the one above) gets an arrow."""
    figure = str(row.get("figure", ""))
    return ("↳ " if figure.startswith(" ") else "") + figure.strip()


_TARGET = re.compile(r"^\s*(ratio|median|p99)\s*(<=|>=)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)?")
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_target(text: str | None, unit: str) -> tuple[str, str, float] | None:
    """('ratio'|'median'|'p99', op, limit in the row's unit) from a target text, or None."""
    if not text:
        return None
    m = _TARGET.match(text)
    if m is None:
        return None
    on, op, limit, tunit = m.group(1), m.group(2), float(m.group(3)), m.group(4)
    row_unit = unit.split()[0] if unit.split() else ""
    if on != "ratio" and tunit and tunit != row_unit:  # e.g. "p99 <= 100 ms" on a row in us
        a, b = _TIME_UNITS.get(tunit), _TIME_UNITS.get(row_unit)
        if a is None or b is None:
            return None
        limit = limit * a / b
    return on, op, limit


def machine_info() -> dict[str, Any]:
    """What the environment of a report lacks: total memory and the CPU model (this machine)."""
    info: dict[str, Any] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def annotate(data: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    """Add the command and machine_info() to every report's environment (run_all --render)."""
    extra = {"command": command, **machine_info()}
    for rep in data:
        rep.setdefault("environment", {}).update(extra)
    return data


def load(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):  # a single report
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) and "rows" in r for r in data):
        raise ValueError(f"{path}: not the JSON of run_all.py --json (a list of reports with 'rows')")
    return data


# -- markdown ------------------------------------------------------------------------------------


def _cell(x: Any) -> str:
    return str(x).replace("\n", " ").replace("|", "\\|")


def _gib(n: Any) -> str:
    return f"{n / (1 << 30):.1f} GiB" if _finite(n) else str(n)


def _header(data: list[dict[str, Any]], results_link: str | None) -> list[str]:
    envs = [r.get("environment") or {} for r in data]
    first = next((e for e in envs if e), {})
    times = sorted(str(e["time"]) for e in envs if e.get("time"))
    sources = list(dict.fromkeys(str(e["source"]) for e in envs if e.get("source")))
    commands = list(dict.fromkeys(str(e["command"]) for e in envs if e.get("command")))
    out = ["# Performance (targets: REFERENCE.md, \"Performance targets\")", ""]
    how = "Measured with " + (f"`{commands[0]}`" if commands else "`python bench/run_all.py` (options not recorded)")
    how += f" on {times[0]}" if times else " (date not recorded)"
    how += "; tables and plots by `tools/render.py`"
    how += f" from [{os.path.basename(results_link)}]({results_link})." if results_link else "."
    out += [how, ""]
    out.append(f"- code: {', '.join(sources) or 'not recorded'} (git commit; `+dirty:<digest>` = uncommitted "
               "changes under src/)")
    if first:
        cpus = f"{first.get('cpus', '?')} CPUs"
        if first.get("cpu_model"):
            cpus += f" ({first['cpu_model']})"
        mem = _gib(first["memory"]) + " memory" if first.get("memory") else "memory not recorded"
        out.append(f"- machine: {first.get('machine', '?')}, {cpus}, {mem}, kernel {first.get('kernel', '?')}")
        out.append(f"- Python {first.get('python', '?')} ({first.get('implementation', '?')})")
    out.append("- ratio: against a baseline measured in the same run, rounds interleaved; for GB/s and other "
               "rates the p99 column is the rate of the slowest 1% sample")
    return out


MISSED_DOC = "PERFORMANCE-MISSED.md"  # the hand-written analysis of missed targets, beside the page


def _summary(data: list[dict[str, Any]]) -> list[str]:
    targeted = [(rep.get("bench", "?"), r) for rep in data for r in rep.get("rows", []) if r.get("target")]
    info = [(rep.get("bench", "?"), r) for rep in data for r in rep.get("rows", [])
            if r.get("headline") and not r.get("target")]
    if not targeted:
        return _informational(info)
    met = sum(1 for _, r in targeted if r.get("passed") and not r.get("error"))
    out = ["", "## Summary", "", f"{met}/{len(targeted)} targets met."]
    if met < len(targeted):
        out.append(f"Why each missed target is missed, with the profiles that show it: [{MISSED_DOC}]({MISSED_DOC}) "
                   "(written by hand, next to this page).")
    out += ["", "| bench | figure | mode | target | measured | result |", "|---|---|---|---|---|---|"]
    for bench, r in targeted:
        target = str(r["target"])
        unit = r.get("unit", "")
        if r.get("error"):
            measured = "not measured"
        elif _finite(r.get("ratio")) and target.startswith("ratio"):
            measured = f"ratio {r['ratio']:.3f} (median {_num(r.get('median'))} {r.get('unit', '')})"
        elif target.startswith("p99"):
            measured = f"p99 {_num(r.get('p99'))} {unit} (median {_num(r.get('median'))} {unit})"
        else:
            measured = f"median {_num(r.get('median'))} {r.get('unit', '')}"
        out.append("| " + " | ".join(_cell(c) for c in (bench, _label(r), r.get("mode", ""), target, measured,
                                                          _verdict(r))) + " |")
    return out + _informational(info)


def _informational(info: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The figures without a target that run_all.py's summary lists too."""
    if not info:
        return []
    out = ["", "Figures without a target (informational):", "", "| bench | figure | mode | measured |",
           "|---|---|---|---|"]
    for bench, r in info:
        if r.get("error"):
            measured = "not measured"
        else:
            measured = f"median {_num(r.get('median'))} {r.get('unit', '')}"
            if _finite(r.get("ratio")):
                measured += f", ratio {r['ratio']:.3f} vs {r.get('baseline')}"
        out.append("| " + " | ".join(_cell(c) for c in (bench, _label(r), r.get("mode", ""), measured)) + " |")
    return out


def _bench_section(rep: dict[str, Any], png_link: str | None, plot_note: str | None) -> list[str]:
    name = rep.get("bench", "?")
    out = ["", f"## {name}: {rep.get('title', name)}", ""]
    params = rep.get("params") or {}
    if params:
        out += ["Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()), ""]
    out += ["| figure | mode | median | p99 | unit | baseline | ratio | target | result |",
            "|---|---|--:|--:|---|---|--:|---|---|"]
    for r in rep.get("rows", []):
        ratio = f"{r['ratio']:.3f}" if _finite(r.get("ratio")) else ""
        cells = (_label(r), r.get("mode", ""), _num(r.get("median")), _num(r.get("p99")), r.get("unit", ""),
                 r.get("baseline") or "", ratio, r.get("target") or "", _verdict(r))
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    errors = [r for r in rep.get("rows", []) if r.get("error")]
    notes = rep.get("notes") or []
    if errors or notes:
        out.append("")
    for r in errors:
        out.append(f"- ERROR {_cell(_label(r))} ({_cell(r.get('mode', ''))}): {_cell(r['error'])}")
    for note in notes:
        out.append(f"- {_cell(note)}")
    out.append("")
    if png_link:
        out.append(f"![{name}]({png_link})")
    else:
        out.append(f"(no plot: {plot_note or 'nothing measured'})")
    return out


def render_markdown(data: list[dict[str, Any]], *, pngs: dict[str, str] | None = None,
                    plot_note: str | None = None, results_link: str | None = None) -> str:
    """The page: header, summary of the targets, then per bench its table, notes and plot.

    `pngs`: bench name -> link of its PNG (relative to the markdown file); `plot_note`: why a
    bench has no plot (e.g. matplotlib missing)."""
    pngs = pngs or {}
    lines = _header(data, results_link)
    if plot_note and not pngs:
        lines += ["", f"**Plots skipped: {plot_note}.**"]
    lines += _summary(data)
    for rep in data:
        name = rep.get("bench", "?")
        lines += _bench_section(rep, pngs.get(name), plot_note if name not in pngs else None)
    return "\n".join(lines).rstrip() + "\n"


# -- plots ---------------------------------------------------------------------------------------

MODE_COLORS = {"embedded": "#4C72B0", "daemon": "#DD8452"}
OTHER_COLOR = "#9A9A9A"
PASS_COLOR, FAIL_COLOR, INFO_COLOR = "#55A868", "#C44E52", "#8C9DB5"
TARGET_COLOR = "black"
WIDTH_IN, ROW_IN, PANEL_IN = 11.0, 0.27, 0.95  # figure width; inches per bar, per panel (title, axis)
AXES_PX, CHAR_PX = 800, 5.6  # about: the axes' width in pixels at dpi 100, a character at 8 pt
LABEL_CHARS = 52  # y labels longer than this wrap onto two lines


def import_pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend; ImportError with a clear message if missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"matplotlib is not installed: plots skipped; install it with {INSTALL_HINT}") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _compact(x: float) -> str:
    """A plot label's number: as in the tables, but 123.5k / 3.87M for large ones."""
    if _finite(x) and abs(x) >= 1e9:
        return f"{x / 1e9:.4g}G"
    if _finite(x) and abs(x) >= 1e6:
        return f"{x / 1e6:.4g}M"
    if _finite(x) and abs(x) >= 1e5:
        return f"{x / 1e3:.4g}k"
    return _num(x)


def _ylabel(row: dict[str, Any], above: dict[str, Any] | None) -> str:
    """'figure [mode]'; a detail row (indented figure) not under its parent or a sibling in the
    panel is named after its parent: 'parent: detail'."""
    parent = row.get("_parent")
    if parent and (above is None or parent not in (above.get("_parent"), str(above.get("figure", "")).strip())):
        text = f"{parent}: {str(row.get('figure', '')).strip()} [{row.get('mode', '')}]"
    else:
        text = f"{_label(row)} [{row.get('mode', '')}]"
    if len(text) <= LABEL_CHARS:
        return text
    cut = text.rfind(" ", 0, LABEL_CHARS)
    cut = cut if cut > LABEL_CHARS // 2 else LABEL_CHARS
    return text[:cut].rstrip() + "\n" + text[cut:].lstrip()


def _higher_is_better(unit: str) -> bool:
    return unit.endswith("/s")


def _short_target(t: tuple[str, str, float], text: str) -> str:
    sign = "≥" if t[1] == ">=" else "≤"
    if t[0] == "ratio":
        return f"target {sign} {t[2]:g}"
    m = _TARGET.match(text)  # as written (e.g. "p99 <= 100 ms", the row being in us)
    return f"target {t[0]} {sign} {m.group(3)} {m.group(4) or ''}".rstrip() if m else f"target {text}"


def _scale(ax: Any, values: list[float], labels: list[tuple[float, str]]) -> None:
    """Log scale when the values span more than 100x; x limits leaving room for the labels, each
    written right of its anchor (labels: (anchor, text))."""
    known = [v for v in values if _finite(v)]
    log = bool(known) and min(known) > 0 and max(known) / min(known) > 100
    lo = min(known, default=1.0) if log else 0.0
    hi = max(known, default=1.0)
    upper = hi * 1.05 if not log else hi * 1.3
    for anchor, text in labels:
        frac = min(0.6, (len(text) * CHAR_PX + 12) / AXES_PX)  # of the axes' width the label needs
        a = anchor if _finite(anchor) and (anchor > 0 or not log) else (lo if log else 0.0)
        # linear: upper - a >= frac * upper; log: the same on log(x), from lo / 1.6
        need = math.exp((math.log(a) - frac * math.log(lo / 1.6)) / (1 - frac)) if log else a / (1 - frac)
        upper = max(upper, need)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, upper)
    else:
        ax.set_xlim(0, upper)
    for y, (anchor, text) in enumerate(labels):
        a = anchor if _finite(anchor) and (anchor > 0 or not log) else (lo if log else 0.0)
        ax.annotate(text, (a, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8,
                    color=FAIL_COLOR if text.startswith("ERROR") else "black", zorder=5,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})


def _target_marks(ax: Any, ys: list[int], limits: list[float | None]) -> None:
    for y, limit in zip(ys, limits, strict=True):
        if limit is not None:
            ax.plot([limit, limit], [y - 0.45, y + 0.45], color=TARGET_COLOR, linewidth=2.5, zorder=4)


def _rows_axis(ax: Any, rows: list[dict[str, Any]], title: str, xlabel: str) -> None:
    labels = [_ylabel(r, rows[i - 1] if i else None) for i, r in enumerate(rows)]
    ax.set_yticks(range(len(rows)), labels, fontsize=8, linespacing=0.95)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel + (", log scale" if ax.get_xscale() == "log" else ""), fontsize=9)
    ax.grid(axis="x", color="#E0E0E0", zorder=0)
    if ax.get_xscale() != "log" and ax.get_xlim()[1] >= 1e4:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500k, 2M rather than a 1e6 offset


def _ratio_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    ys = list(range(len(rows)))
    values = [r["ratio"] if _finite(r.get("ratio")) else math.nan for r in rows]
    targets = [parse_target(r.get("target"), r.get("unit", "")) for r in rows]
    limits = [t[2] if t and t[0] == "ratio" else None for t in targets]
    labels = []
    for v, t, limit, r in zip(values, targets, limits, rows, strict=True):
        text = "ERROR: not measured" if r.get("error") else (f"{v:.3f}" if _finite(v) else "-")
        if t and limit is not None:
            text += f"  ({_short_target(t, r['target'])})"
        labels.append((max([x for x in (v, limit) if x is not None and _finite(x)], default=math.nan), text))
    _scale(ax, values + [x for x in limits if x is not None] + [1.0], labels)
    colors = []
    for r, limit in zip(rows, limits, strict=True):  # coloured by the ratio's target only
        verdict = _verdict(r) if limit is not None else ""
        colors.append(PASS_COLOR if verdict == "PASS" else FAIL_COLOR if verdict in ("FAIL", "ERROR") else INFO_COLOR)
    ax.barh(ys, [v if _finite(v) else 0 for v in values], color=colors, height=0.7, zorder=2)
    ax.axvline(1.0, color="#444444", linestyle="--", linewidth=1, zorder=2.5)
    _target_marks(ax, ys, limits)
    _rows_axis(ax, rows, "ratio vs the same-run baseline (green: target met, red: missed, grey-blue: no ratio target)",
               "ratio (dashed line: 1.0 = the baseline)")


def _medians_panel(ax: Any, unit: str, rows: list[dict[str, Any]]) -> None:
    ys = list(range(len(rows)))
    med = [r["median"] if _finite(r.get("median")) else math.nan for r in rows]
    p99 = [r["p99"] if _finite(r.get("p99")) else math.nan for r in rows]
    targets = [parse_target(r.get("target"), unit) for r in rows]
    limits = [t[2] if t and t[0] != "ratio" else None for t in targets]
    labels = []
    for m, p, t, limit, r in zip(med, p99, targets, limits, rows, strict=True):
        text = "ERROR: " + str(r["error"])[:70] if r.get("error") else (_compact(m) if _finite(m) else "no value")
        if t and limit is not None:
            text += f"  ({_short_target(t, r['target'])})"
        labels.append((max([x for x in (m, p, limit) if x is not None and _finite(x)], default=math.nan), text))
    _scale(ax, med + p99 + [x for x in limits if x is not None], labels)
    colors = [MODE_COLORS.get(str(r.get("mode", "")), OTHER_COLOR) for r in rows]
    ax.barh(ys, [v if _finite(v) else 0 for v in med], color=colors, height=0.7, zorder=2)
    for y, m, p in zip(ys, med, p99, strict=True):
        if _finite(m) and _finite(p):
            ax.errorbar([m], [y], xerr=[[max(0.0, m - p)], [max(0.0, p - m)]], fmt="none", ecolor="black",
                        elinewidth=1, capsize=3, zorder=3)
    _target_marks(ax, ys, limits)
    up = _higher_is_better(unit)
    kind = "throughput" if up else "time"
    _rows_axis(ax, rows, f"{kind}, {unit or 'no unit'} ({'higher' if up else 'lower'} is better): "
               "bar = median, whisker = the p99 sample", unit or "value")


def plot_report(plt: Any, rep: dict[str, Any], path: str) -> bool:
    """One PNG for one bench; False (nothing written) when it has no figure to draw."""
    rows, parent = [], None
    for r in rep.get("rows", []):  # copies, with the figure a detail row belongs to
        figure = str(r.get("figure", ""))
        parent = parent if figure.startswith(" ") else figure.strip()
        rows.append({**r, "_parent": parent if figure.startswith(" ") else None})
    if not any(_finite(r.get("median")) for r in rows):
        return False
    ratio_rows = [r for r in rows if _finite(r.get("ratio"))
                  or (r.get("error") and str(r.get("target") or "").startswith("ratio"))]
    by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _finite(r.get("median")) or r.get("error"):
            by_unit.setdefault(str(r.get("unit", "")), []).append(r)
    panels: list[tuple[str | None, list[dict[str, Any]]]] = [(None, ratio_rows)] if ratio_rows else []
    panels += list(by_unit.items())
    heights = [PANEL_IN + ROW_IN * len(rs) for _, rs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH_IN, sum(heights) + 0.6), layout="constrained",
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    try:
        for ax, (unit, rs) in zip(axes[:, 0], panels, strict=True):
            if unit is None:
                _ratio_panel(ax, rs)
            else:
                _medians_panel(ax, unit, rs)
        modes = {str(r.get("mode", "")) for r in rows}
        keys = [(m, c) for m, c in MODE_COLORS.items() if m in modes]
        if modes - set(MODE_COLORS):
            keys.append(("baseline / other", OTHER_COLOR))
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, c in keys]
        labels = [m for m, _ in keys]
        if any(r.get("target") for r in rows):
            handles.append(plt.Line2D([], [], color=TARGET_COLOR, linewidth=2.5))
            labels.append("target")
        fig.legend(handles, labels, loc="outside upper right", ncols=len(labels), fontsize=8, frameon=False)
        fig.suptitle(f"{rep.get('bench', '?')}: {rep.get('title', '')}", fontsize=12, x=0.01, ha="left")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)
    _write_png(buf.getvalue(), path)
    return True


def _write_png(png: bytes, path: str) -> None:
    """Write the PNG with a palette of its 256 most frequent colours (a third of the size; bars, lines
    and legend keep their exact colours, only some anti-aliased edge pixels move to a near colour)
    when Pillow (a dependency of matplotlib) can do it; as drawn otherwise."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as drawn:
            im = drawn.convert("RGB")
        counts = im.getcolors(maxcolors=1 << 24) or []
        flat = [c for _, rgb in sorted(counts, reverse=True)[:256] for c in rgb]
        palette = Image.new("P", (1, 1))
        palette.putpalette(flat + flat[:3] * (256 - len(flat) // 3))
        small = io.BytesIO()
        im.quantize(palette=palette, dither=Image.Dither.NONE).save(small, "PNG", optimize=True)
        png = small.getvalue()
    except Exception:  # keep the full-colour image
        pass
    with open(path, "wb") as f:
        f.write(png)


# -- the whole rendering -------------------------------------------------------------------------


def render(data: list[dict[str, Any]], *, out_dir: str | None = DEFAULT_OUT, markdown: str | None = DEFAULT_MARKDOWN,
           results_path: str | None = None, log: Log = print) -> bool:
    """PNGs into out_dir (None: no plots), the markdown to `markdown` (None: none).

    Returns False when the plots had to be skipped (matplotlib missing): the markdown is written anyway."""
    md_dir = os.path.dirname(os.path.abspath(markdown)) if markdown else os.getcwd()
    pngs: dict[str, str] = {}
    plot_note: str | None = None
    ok = True
    if out_dir is not None:
        try:
            plt = import_pyplot()
        except ImportError as exc:
            plot_note = f"matplotlib is not installed (install it with `{INSTALL_HINT.split('  ')[0]}`)"
            log(f"render: {exc}")
            ok = False
        else:
            os.makedirs(out_dir, exist_ok=True)
            for rep in data:
                name = str(rep.get("bench", "bench"))
                path = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png")
                if plot_report(plt, rep, path):
                    pngs[name] = os.path.relpath(os.path.abspath(path), md_dir)
                    log(f"PNG written to {path}")
            if not pngs:
                plot_note = "nothing measured"
    else:
        plot_note = "not requested"
    if markdown:
        link = os.path.relpath(os.path.abspath(results_path), md_dir) if results_path else None
        text = render_markdown(data, pngs=pngs, plot_note=plot_note, results_link=link)
        os.makedirs(md_dir, exist_ok=True)
        with open(markdown, "w") as f:
            f.write(text)
        log(f"markdown written to {markdown}" + ("" if ok else " (plots skipped)"))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the JSON written by `python bench/run_all.py --json PATH`")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="directory for the PNGs (default docs/perf)")
    parser.add_argument("--markdown", default=DEFAULT_MARKDOWN, metavar="PATH",
                        help="markdown file to write (default docs/PERFORMANCE.md)")
    ns = parser.parse_args(argv)
    try:
        data = load(ns.results)
    except (OSError, ValueError) as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    ok = render(data, out_dir=ns.out, markdown=ns.markdown, results_path=ns.results,
                log=lambda msg: print(msg, file=sys.stdout if not msg.startswith("render:") else sys.stderr))
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
