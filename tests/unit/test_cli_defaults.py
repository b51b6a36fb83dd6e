"""`ugem serve --help` shows the defaults config.py holds (one source: no copy in cli.py)."""

from __future__ import annotations

import dataclasses

import pytest

from ugem import cli
from ugem.config import Config


def test_serve_help_shows_the_config_defaults(capsys, monkeypatch):
    fields = {f.name: f for f in dataclasses.fields(Config)}
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {fields['vram'].default >> 30}G" in text
    assert f"default {fields['pin_limit'].default >> 20}M" in text
    for key in ("client_max_objects", "hang_timeout", "uid_max_clients"):
        assert f"default {fields[key].default:g}" in text, key
    monkeypatch.setattr(Config, "pin_limit", 3 << 20)  # the help follows config.py
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "default 3M" in " ".join(capsys.readouterr().out.split())
