"""`make demo` brings up slapd + redis with the sample directory and `make demo-stop` ends them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import demo
from harness.ports import free_port
from mailwarden.cli import main


def test_demo_up_answers_explain_and_down_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "STATE", tmp_path / "demo")
    monkeypatch.setattr(demo, "LDAP_PORT", free_port())
    monkeypatch.setattr(demo, "REDIS_PORT", free_port())
    assert demo.main(["demo", "up"]) == 0
    try:
        pids = {n: int(p.read_text()) for n, p in demo._pidfiles().items()}
        assert all(demo._alive(pid, n) for n, pid in pids.items())
        config = tmp_path / "demo" / "mailwarden.toml"
        assert f"export MAILWARDEN_CONFIG={config}" in capsys.readouterr().out
        result = CliRunner().invoke(main, ["--config", str(config), "config", "check", "--connect"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, ["--config", str(config), "explain", "carol@example.com"])
        assert "greylisting            on   from user" in result.output
    finally:
        assert demo.main(["demo", "down"]) == 0
    assert not any(demo._alive(pid, n) for n, pid in pids.items())
    assert "stopped: slapd" in capsys.readouterr().out
