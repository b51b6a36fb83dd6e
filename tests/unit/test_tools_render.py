"""tools/render.py: the markdown page and the PNGs from a hand-made run_all.py JSON.

Two reports: one with a passed and a failed ratio target, a row without a target and a
p99 target in ms on a row in us; one with a row whose runner failed (error) and a row whose
median is NaN. tools/ is not a package: render.py is loaded from its path.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RENDER = Path(__file__).resolve().parents[2] / "tools" / "render.py"


@pytest.fixture(scope="module")
def render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_render", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(figure: str, mode: str, unit: str, median: float, p99: float, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"bench": "", "figure": figure, "mode": mode, "unit": unit, "median": median, "p99": p99,
                         "samples": 5, "baseline": None, "ratio": None, "ratio_note": "", "target": None,
                         "passed": None, "run_medians": [median], "error": "", "headline": False}
    r.update(kw)
    return r


ENV = {"python": "3.11.7", "implementation": "CPython", "kernel": "6.1.0-test", "machine": "x86_64", "cpus": 2,
       "time": "2026-01-02T03:04:05+0000", "source": "abc1234", "memory": 8 << 30,
       "command": "python bench/run_all.py --only fake other"}


def fake_results() -> list[dict[str, Any]]:
    fake = {"bench": "fake", "title": "fake bulk copies", "params": {"runs": 3, "size": "64 MiB"}, "environment": ENV,
            "rows": [row("memcpy", "baseline", "GB/s", 6.5, 6.1),
                     row("pwrite warm", "embedded", "GB/s", 6.0, 5.9, baseline="memcpy", ratio=0.923,
                         target="ratio >= 0.85", passed=True),
                     row("pwrite warm", "daemon", "GB/s", 3.0, 2.5, baseline="memcpy", ratio=0.4615,
                         target="ratio >= 0.7", passed=False),
                     row("  pwrite, 1 MiB calls", "daemon", "GB/s", 4.0, 3.5, baseline="memcpy", ratio=0.615),
                     row("client B info, during spill", "daemon", "us", 120.0, 2500.0,
                         target="p99 <= 100 ms", passed=True)],
            "notes": ["ratio = median / median of the baseline | same run"]}
    other = {"bench": "other", "title": "other figures", "params": {"n": 10}, "environment": ENV,
             "rows": [row("busy round trip", "daemon", "us", math.nan, math.nan, error="RuntimeError: no device",
                          target="ratio <= 1.5", passed=False),
                      row("CPU per info(h)", "daemon", "us CPU", 70.5, math.nan, headline=True),
                      row("idle objects", "daemon", "us", math.nan, math.nan)],
             "notes": []}
    return [fake, other]


def write(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_results()))  # NaN written as NaN, as run_all.py does
    return path


def test_markdown_rows_header_and_notes(render: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "import_pyplot", lambda: pytest.fail("plots were not asked for"))
    data = render.load(str(write(tmp_path)))
    md = tmp_path / "PERFORMANCE.md"
    assert render.render(data, out_dir=None, markdown=str(md), results_path=str(tmp_path / "results.json"),
                         log=lambda msg: None)
    text = md.read_text()
    assert "`python bench/run_all.py --only fake other` on 2026-01-02T03:04:05+0000" in text
    assert "[results.json](results.json)" in text
    assert "abc1234" in text and "2 CPUs" in text and "8.0 GiB memory" in text and "kernel 6.1.0-test" in text
    assert "Python 3.11.7" in text
    assert "| figure | mode | median | p99 | unit | baseline | ratio | target | result |" in text
    assert "| pwrite warm | embedded | 6.000 | 5.900 | GB/s | memcpy | 0.923 | ratio >= 0.85 | PASS |" in text
    assert "| pwrite warm | daemon | 3.000 | 2.500 | GB/s | memcpy | 0.462 | ratio >= 0.7 | FAIL |" in text
    assert "| ↳ pwrite, 1 MiB calls | daemon | 4.000 | 3.500 | GB/s | memcpy | 0.615 |  |  |" in text  # no target
    assert "| client B info, during spill | daemon | 120.0 | 2500.0 | us |  |  | p99 <= 100 ms | PASS |" in text
    assert "| busy round trip | daemon | - | - | us |  |  | ratio <= 1.5 | ERROR |" in text  # error row
    assert "- ERROR busy round trip (daemon): RuntimeError: no device" in text
    assert "| CPU per info(h) | daemon | 70.50 | - | us CPU |  |  |  |  |" in text  # NaN p99
    assert "| idle objects | daemon | - | - | us |  |  |  |  |" in text  # NaN median, no error
    assert "- ratio = median / median of the baseline \\| same run" in text
    assert "2/4 targets met." in text
    assert f"[{render.MISSED_DOC}]({render.MISSED_DOC})" in text  # the hand-written why, once a target is missed
    assert "| other | CPU per info(h) | daemon | median 70.50 us CPU |" in text  # informational (headline)
    assert text.index("## fake: fake bulk copies") < text.index("## other: other figures")
    assert "Parameters: `runs=3`, `size=64 MiB`" in text
    # a function of the JSON only: the same results render to the same page
    assert render.render_markdown(data, plot_note="not requested", results_link="results.json") == text



def test_the_why_of_missed_targets_is_linked_only_while_one_is_missed(render: ModuleType) -> None:
    data = fake_results()
    for rep in data:
        rep["rows"] = [r for r in rep["rows"] if not r.get("target") or r.get("passed")]
    text = render.render_markdown(data, plot_note="not requested")
    assert "2/2 targets met." in text and render.MISSED_DOC not in text

def test_pngs(render: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, md = tmp_path / "perf", tmp_path / "docs" / "PERFORMANCE.md"
    assert render.main([str(write(tmp_path)), "--out", str(out), "--markdown", str(md)]) == 0
    for name in ("fake", "other"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < png.stat().st_size < 400_000
        assert f"![{name}](../perf/{name}.png)" in md.read_text()


def test_without_matplotlib(render: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    def missing() -> None:
        raise ImportError("matplotlib is not installed: plots skipped; install it with ...")

    monkeypatch.setattr(render, "import_pyplot", missing)
    out, md = tmp_path / "perf", tmp_path / "PERFORMANCE.md"
    assert render.main([str(write(tmp_path)), "--out", str(out), "--markdown", str(md)]) == 2
    assert "matplotlib is not installed" in capsys.readouterr().err
    text = md.read_text()
    assert "Plots skipped: matplotlib is not installed" in text
    assert "| pwrite warm | embedded |" in text
    assert not out.exists()


def test_parse_target(render: ModuleType) -> None:
    assert render.parse_target("ratio >= 0.952 (time <= 1.05 x)", "GB/s") == ("ratio", ">=", 0.952)
    assert render.parse_target("p99 <= 100 ms", "us") == ("p99", "<=", pytest.approx(100_000.0))
    assert render.parse_target("median <= 15 us", "us") == ("median", "<=", 15.0)
    assert render.parse_target("runs", "") is None
    assert render.parse_target(None, "us") is None
