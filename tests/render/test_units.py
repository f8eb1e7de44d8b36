"""deploy/systemd/: every unit parses into the sections and keys systemd expects, the
commands it runs exist, and the expiry services and timers (quarantine, archive) have the daemons'
account and hardening and run daily.  `systemd-analyze verify` checks them too where it
is installed (systemd need not be running)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailwarden.cli import main

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SECTIONS = {".service": {"Unit", "Service", "Install"}, ".timer": {"Unit", "Timer", "Install"}}
EXPIRE = "mailwarden-quarantine-expire"
HARDENING = (
    "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "ProtectHome",
    "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "LockPersonality", "RemoveIPC", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """``{section: {key: [values]}}``; a line outside a section, or neither a key nor a
    section header nor a comment, fails the test."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.name}:{number}"
        if not line.strip() or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{where}: no continuation lines"
        if line.startswith("["):
            assert line.endswith("]"), where
            name = line[1:-1]
            assert name not in sections, f"{where}: [{name}] twice"
            current = sections[name] = {}
            continue
        key, sep, value = line.partition("=")
        assert sep and key and key == key.strip() and key.isalnum(), f"{where}: not Key=value: {line!r}"
        assert current is not None, f"{where}: {key} before any section"
        current.setdefault(key, []).append(value)
    return sections


def unit_files() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in SECTIONS)


def test_every_unit_has_its_sections_and_names_existing_commands() -> None:
    names = [p.name for p in unit_files()]
    assert {f"{EXPIRE}.service", f"{EXPIRE}.timer", "mailwarden-milter.service",
            "mailwarden-policyd.service"} <= set(names)
    readme = (UNITS / "README.md").read_text()
    for path in unit_files():
        unit = parse_unit(path)
        assert set(unit) <= SECTIONS[path.suffix], (path.name, set(unit))
        assert unit["Unit"]["Description"][0].strip(), path.name
        if path.suffix == ".service":
            service = unit["Service"]
            assert len(service["ExecStart"]) == 1, path.name
            assert service["User"] == ["mailwarden"] and service["Group"] == ["mailwarden"], path.name
            assert service["Environment"] == ["MAILWARDEN_CONFIG=/etc/mailwarden/mailwarden.toml"]
            for command in [*service.get("ExecStartPre", []), *service["ExecStart"]]:
                if command.startswith("/usr/bin/mailwarden "):
                    args = command.split()[1:]
                    shown = CliRunner().invoke(main, [*args, "--help"])
                    assert shown.exit_code == 0, (path.name, command, shown.output)
        assert f"`{path.name}`" in readme, f"deploy/systemd/README.md does not list {path.name}"


@pytest.mark.parametrize(("unit", "command"), [
    (EXPIRE, "/usr/bin/mailwarden quarantine expire"),
    ("mailwarden-archive-expire", "/usr/bin/mailwarden archive expire --all"),
])
def test_expiries_run_daily_as_the_daemons_run(unit: str, command: str) -> None:
    service = parse_unit(UNITS / f"{unit}.service")
    timer = parse_unit(UNITS / f"{unit}.timer")
    daemon = parse_unit(UNITS / "mailwarden-milter.service")["Service"]
    run = service["Service"]
    assert run["Type"] == ["oneshot"] and run["ExecStart"] == [command]
    # Started by its timer only; a oneshot does not restart.
    assert "Install" not in service and "Restart" not in run
    assert run["StateDirectory"] == daemon["StateDirectory"] and run["UMask"] == daemon["UMask"]
    for key in HARDENING:
        assert run.get(key) == daemon.get(key), (key, run.get(key), daemon.get(key))
    when = timer["Timer"]
    assert when["OnCalendar"] == ["daily"] and when["Persistent"] == ["true"]
    assert "Unit" not in when  # the timer starts the service of its own name
    assert timer["Install"]["WantedBy"] == ["timers.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    venv_cli = str(Path(sys.executable).with_name("mailwarden"))
    copies = []
    for path in unit_files():
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("/usr/bin/mailwarden", venv_cli))
        copies.append(str(copy))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *copies], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
