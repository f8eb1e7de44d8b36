"""``mailwarden selftest`` without live backends: the table, the exit status, --skip
(the live stack and each backend stopped: tests/milter/test_operations.py)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mailwarden.cli.common import App
from mailwarden.cli.selftest import selftest_cmd
from mailwarden.selftest import Row, Status, exit_status, probes, table

EVERY = ["ldap", "store", "dns", "clamd", "spamd", "rspamd", "reinject", "dkim"]


def test_the_core_and_the_registered_daemons_probes() -> None:
    assert [name for name, _ in probes()] == EVERY


def test_misconfigured_wins_over_unavailable() -> None:
    ok, down = Row.ok("a", "fine"), Row("b", Status.UNAVAILABLE, "refused", "start it")
    wrong = Row("c", Status.MISCONFIGURED, "no signatures", "run freshclam")
    assert exit_status([ok]) == 0 and exit_status([ok, down]) == 75 and exit_status([down, wrong, ok]) == 78
    assert table([ok, down]) == ["check  status         detail",
                                 "a      ok             fine",
                                 "b      unavailable    refused",
                                 "                      fix: start it"]


def test_skip_leaves_probes_out_and_names_unknown_ones(tmp_path: Path) -> None:
    keys = tmp_path / "dkim"
    config = tmp_path / "mailwarden.toml"
    config.write_text(f'[milter]\ndkim_key_path = "{keys}/{{domain}}.{{selector}}.key"\n')
    only_dkim = [a for name in EVERY[:-1] for a in ("--skip", name)]
    result = CliRunner().invoke(selftest_cmd, only_dkim, obj=App(str(config)))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [f"dkim   ok             no keys yet ({keys}/*.*.key)"]
    keys.mkdir()
    (keys / "example.jp.mw1.key").write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n")
    broken = CliRunner().invoke(selftest_cmd, only_dkim, obj=App(str(config)))
    assert broken.exit_code == 78 and "misconfigured" in broken.output and "dkim keygen" in broken.output
    unknown = CliRunner().invoke(selftest_cmd, ["--skip", "clamav"], obj=App(str(config)))
    assert unknown.exit_code == 2 and "no probe named clamav" in unknown.output
