"""``mailwarden milter check|scan`` and ``mailwarden quarantine ...``, and the [milter] checks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.clamd import EICAR, ClamdServer
from harness.ports import free_port
from harness.slapd import SERVICE_BIND, SlapdServer
from harness.smtpsink import SmtpSink
from harness.spamd import SpamdServer
from mailwarden.cli import main
from mailwarden.config import parse_config
from mailwarden.store import SQLiteStore
from milters.config import MilterConfig, check_milter_config
from milters.quarantine import Quarantine
from tests.milter.conftest import archive_section
from tests.milter.helpers import make_message


def write_config(tmp: Path, extra: str = "", ldap_uri: str = "ldap://127.0.0.1:9/") -> Path:
    path = tmp / "mailwarden.toml"
    path.write_text(
        f'[ldap]\nuri = "{ldap_uri}"\n{SERVICE_BIND}retry_max = 0\nnetwork_timeout = 1.0\ntimeout = 1.0\n'
        f'[store]\nbackend = "sqlite"\nsqlite_path = "{tmp}/state.sqlite3"\n'
        f'[milter]\nquarantine_dir = "{tmp}/q"\nspool_dir = "{tmp}/spool"\ntemplate_dir = "{tmp}/t"\n{extra}'
    )
    return path


def run(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    return result.exit_code, result.output


# ---------------------------------------------------------------- config checks


def test_shipped_defaults_pass_the_checks() -> None:
    cfg = parse_config("", "t.toml")
    assert check_milter_config(MilterConfig.of(cfg), ldap_worst_case=16.0) == []


@pytest.mark.parametrize(("toml", "problem"), [
    ('socket = "tcp:1234"', "milter.socket"),
    ('clamd = ["clamd.sock"]', "milter.clamd[0]"),
    ("spamd = []", "milter.spamd"),
    ('reinject = "smtp://x"', "milter.reinject"),
    ('reinject = "unix:/run/smtpd.sock"', "milter.reinject"),
    ("clamd_timeout = 290.0", "milter.clamd_timeout"),
    ("memory_limit = 0", "milter.memory_limit"),
    ('socket_mode = "rw"', "milter.socket_mode"),
    ('notice_from = "{user}@x"', "milter.notice_from"),
    ("workers = 0", "milter.workers"),
    ('event_loop = "gevent"', "milter.event_loop"),
    ('spamd = ["inet:[::1]"]', "milter.spamd[0]"),
    ('dkim_key_path = "/etc/dkim/{selector}.key"', "milter.dkim_key_path"),
    ('dkim_key_path = "/etc/dkim/{domain}.{user}.key"', "milter.dkim_key_path"),
    ('internal_networks = ["10.0.0.0/8", "mynetworks"]', "milter.internal_networks[1]"),
    ('authserv_id = "mx1; dkim=pass"', "milter.authserv_id"),
])
def test_bad_milter_settings_are_named(toml: str, problem: str) -> None:
    cfg = parse_config(f"[milter]\n{toml}\n", "t.toml")
    assert any(p.startswith(problem) for p in check_milter_config(MilterConfig.of(cfg), ldap_worst_case=16.0))


def test_directory_time_must_fit_in_postfix_command_timeout() -> None:
    problems = check_milter_config(MilterConfig(), ldap_worst_case=31.0)
    assert any("postfix_command_timeout" in p for p in problems)


def test_milter_check_names_file_and_key(tmp_path: Path) -> None:
    code, out = run(write_config(tmp_path, "clamd_timeout = 400.0\n"), "milter", "check")
    assert code == 78 and "mailwarden.toml:milter.clamd_timeout" in out


def test_milter_check_wants_the_archive_master_password_when_archiving_over_imap(tmp_path: Path) -> None:
    missing = tmp_path / "absent.key"
    config = write_config(tmp_path, f'[render]\narchive_imap_port = 1143\n'
                                    f'archive_master_password_file = "{missing}"\n')
    code, out = run(config, "milter", "check")
    assert code == 78 and "mailwarden.toml:render.archive_master_password_file" in out and str(missing) in out
    missing.write_text("s3cret\n")
    assert run(config, "milter", "check")[0] == 0


def test_milter_check_connect_reaches_every_backend(tmp_path: Path, slapd: SlapdServer, clamd: ClamdServer,
                                                    spamd: SpamdServer) -> None:
    """The sample data's example.com archives into archive@example.com: its mailbox host
    (here an LMTP sink) is asked whether it takes copies for it; nothing is delivered."""
    with SmtpSink(lmtp=True) as lmtp:
        cfg = write_config(tmp_path, f'clamd = ["{clamd.unix_address}"]\nspamd = ["{spamd.address}"]\n'
                                     f'{archive_section(lmtp.port)}', ldap_uri=slapd.uri)
        code, out = run(cfg, "milter", "check", "--connect")
        assert code == 0, out
        assert "clamd: " in out and "PONG" in out and "store: OK" in out and "directory: OK" in out
        assert f"archive archive@example.com: LMTP: archive@example.com at 127.0.0.1:{lmtp.port} accepts " \
               "copies; each LMTP copy costs Dovecot more as the archive grows" in out
        assert lmtp.messages == []
        # The archive mailbox refused (gone from the mailbox host): the check fails.
        lmtp.reject_recipients = {"archive@example.com": "550 5.1.1 no such user"}
        code, out = run(cfg, "milter", "check", "--connect")
        assert code == 75 and "archive archive@example.com: FAILED archive@example.com at " in out
        assert "refused: 550" in out


def test_milter_check_connect_fails_with_75_when_clamd_is_down(tmp_path: Path, slapd: SlapdServer) -> None:
    cfg = write_config(tmp_path, f'clamd = ["unix:{tmp_path}/none.sock"]\n', ldap_uri=slapd.uri)
    code, out = run(cfg, "milter", "check", "--connect")
    assert code == 75 and "clamd: FAILED" in out
    # No mailbox host for the sample data's archive mailbox: that is named too.
    assert "archive archive@example.com: FAILED archive mailbox archive@example.com has no mail_host" in out


def test_milter_scan_dry_runs_a_message(tmp_path: Path, slapd: SlapdServer, clamd: ClamdServer,
                                        spamd: SpamdServer) -> None:
    cfg = write_config(tmp_path, f'clamd = ["{clamd.unix_address}"]\nspamd = ["{spamd.address}"]\n',
                       ldap_uri=slapd.uri)
    eml = tmp_path / "virus.eml"
    eml.write_bytes(make_message(body=EICAR.decode()).as_bytes())
    code, out = run(cfg, "milter", "scan", str(eml), "--rcpt", "taro@example.jp", "--rcpt",
                    "hanako@example.jp")
    assert code == 0, out
    assert "disposition: accept" in out
    assert "taro@example.jp=reject[virus Custom.Test.EICAR" in out and "hanako@example.jp=deliver" in out


# ---------------------------------------------------------------- quarantine


@pytest.fixture
def quarantined(tmp_path: Path) -> tuple[Path, str]:
    cfg = write_config(tmp_path)
    q = Quarantine(SQLiteStore(str(tmp_path / "state.sqlite3")), tmp_path / "q", retention_days=30)
    entry = q.put([make_message(subject="held").as_bytes()], sender="s@remote.example",
                  recipients=["taro@example.jp"], reason="keyword rule", queue_id="QQ1", subject="held")
    return cfg, entry.id


def test_quarantine_list_and_show(quarantined: tuple[Path, str]) -> None:
    cfg, entry_id = quarantined
    code, out = run(cfg, "quarantine", "list")
    assert code == 0 and entry_id in out and "taro@example.jp" in out and "keyword rule" in out
    code, out = run(cfg, "quarantine", "show", entry_id)
    assert code == 0 and "QQ1" in out and "Subject: held" in out
    code, out = run(cfg, "quarantine", "show", "--raw", entry_id)
    assert "Subject: held" in out


def test_quarantine_release_delivers_and_removes(quarantined: tuple[Path, str], tmp_path: Path) -> None:
    cfg, entry_id = quarantined
    with SmtpSink() as sink:
        cfg.write_text(cfg.read_text() + f'reinject = "inet:127.0.0.1:{sink.port}"\n')
        code, out = run(cfg, "quarantine", "release", entry_id)
        assert code == 0, out
        (msg,) = sink.wait_for(1)
    assert msg.recipients == ("taro@example.jp",) and msg.envelope_sender == "s@remote.example"
    assert run(cfg, "quarantine", "show", entry_id)[0] == 1
    assert [p for p in (tmp_path / "q").rglob("*") if p.is_file()] == []


def test_quarantine_release_drops_fields_set_outside_that_only_mailwarden_may_set(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    q = Quarantine(SQLiteStore(str(tmp_path / "state.sqlite3")), tmp_path / "q", retention_days=30)
    forged = make_message(subject="held", headers={
        "X-Mailwarden-Junk": "yes", "X-Spam-Flag": "YES", "X-Mailwarden-Id": "forged", "X-Mailer": "kept",
    }).as_bytes()
    entry = q.put([forged], sender="s@remote.example", recipients=["taro@example.jp"], reason="keyword rule",
                  mwid="06h4s2i8u2ai0f91")
    with SmtpSink() as sink:
        cfg.write_text(cfg.read_text() + f'reinject = "inet:127.0.0.1:{sink.port}"\n')
        code, out = run(cfg, "quarantine", "release", entry.id)
        assert code == 0, out
        (msg,) = sink.wait_for(1)
    assert b"X-Mailwarden-Junk" not in msg.data and b"X-Spam-Flag" not in msg.data
    # The original's mailwarden id, for `mailwarden trace`, in place of the forged one.
    assert msg.data.count(b"X-Mailwarden-Id") == 1 and b"X-Mailwarden-Id: 06h4s2i8u2ai0f91\r\n" in msg.data
    assert b"Subject: held" in msg.data and b"X-Mailer: kept" in msg.data
    assert msg.data.rstrip().endswith(b"hello")


def test_quarantine_release_to_another_address(quarantined: tuple[Path, str]) -> None:
    cfg, entry_id = quarantined
    with SmtpSink() as sink:
        cfg.write_text(cfg.read_text() + f'reinject = "inet:127.0.0.1:{sink.port}"\n')
        assert run(cfg, "quarantine", "release", entry_id, "--to", "helpdesk@example.jp")[0] == 0
        assert sink.wait_for(1)[0].recipients == ("helpdesk@example.jp",)


def test_quarantine_release_fails_softly_when_postfix_is_away(quarantined: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    cfg, entry_id = quarantined
    cfg.write_text(cfg.read_text() + f'reinject = "inet:127.0.0.1:{free_port()}"\n')  # nobody there
    code, out = run(cfg, "quarantine", "release", entry_id)
    assert code == 75 and "not released" in out
    assert run(cfg, "quarantine", "show", entry_id)[0] == 0  # still there


def test_quarantine_delete_and_unknown_ids(quarantined: tuple[Path, str]) -> None:
    cfg, entry_id = quarantined
    assert run(cfg, "quarantine", "delete", entry_id) == (0, f"{entry_id}: deleted\n")
    assert run(cfg, "quarantine", "delete", entry_id)[0] == 1
    code, out = run(cfg, "quarantine", "show", "../../etc/passwd")
    assert code == 1 and "not a quarantine id" in out


def test_quarantine_expire_removes_files_whose_entry_expired(quarantined: tuple[Path, str],
                                                            tmp_path: Path) -> None:
    cfg, entry_id = quarantined
    SQLiteStore(str(tmp_path / "state.sqlite3")).delete(f"quarantine:{entry_id}")  # as if its TTL ran out
    (tmp_path / "q" / "20260101000000-0123456789.eml").write_bytes(b"orphan")
    hour_ago = time.time() - 3700  # past the grace a put between file and entry gets
    for path in (tmp_path / "q").rglob("*.eml"):
        os.utime(path, (hour_ago, hour_ago))
    code, out = run(cfg, "quarantine", "expire")
    assert code == 0 and "2 expired" in out
    assert [p for p in (tmp_path / "q").rglob("*") if p.is_file()] == []
