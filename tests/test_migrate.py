"""The migration state machine and the copy bookkeeping, with the fake directory and a fake
mailbox copier (the real copy is exercised in tests/render/test_migration.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.fakes import FakeDirectory
from mailwarden.catalogue import SETTINGS, InvalidValue
from mailwarden.migrate import (
    DoveadmMailboxes,
    LegacyServer,
    Migration,
    MigrationError,
    UserCopy,
    check_transition,
    is_legacy,
)


def test_steps_follow_the_states() -> None:
    assert check_transition("sync", "legacy") == "syncing"
    assert check_transition("sync", "syncing") == "syncing"
    assert check_transition("cutover", "syncing") == "migrated"
    assert check_transition("rollback", "migrated") == "legacy"
    assert check_transition("rollback", "syncing") == "legacy"
    with pytest.raises(MigrationError, match="run mailwarden migrate sync first"):
        check_transition("cutover", "legacy")
    with pytest.raises(MigrationError, match="roll back first"):
        check_transition("sync", "migrated")
    with pytest.raises(MigrationError, match="already served by the legacy system"):
        check_transition("rollback", "legacy")
    assert is_legacy("legacy") and is_legacy("syncing") and not is_legacy("migrated")


def test_state_and_hosts_are_domain_settings() -> None:
    state = SETTINGS["migration_state"]
    assert state.scope == "domain" and state.default == "migrated"
    assert state.parse(["Syncing"]) == "syncing"
    with pytest.raises(InvalidValue):
        state.parse(["moving"])
    assert SETTINGS["legacy_mx"].parse(["[192.0.2.7]:25"]) == "[192.0.2.7]:25"
    with pytest.raises(InvalidValue):
        SETTINGS["legacy_mailbox_host"].parse(["not a host"])


class FakeMailboxes:
    """Two sides of message counts; a copy makes the target like the source."""

    def __init__(self, legacy: dict[str, int], new: dict[str, int], broken: set[str] | None = None) -> None:
        self.legacy, self.new, self.broken = legacy, new, broken or set()
        self.states: list[tuple[str, bool, str]] = []

    def count(self, user: str, *, legacy: bool) -> int:
        return (self.legacy if legacy else self.new).get(user, 0)

    def pull(self, user: str, *, exact: bool, state: str = "") -> str:
        if user in self.broken:
            raise MigrationError(f"{user}: doveadm backup exited 75: connection refused")
        self.states.append((user, exact, state))
        self.new[user] = self.legacy[user] if exact else max(self.legacy[user], self.new.get(user, 0))
        return "" if exact else f"seen-{self.legacy[user]}"

    def push(self, user: str) -> list[str]:
        self.legacy[user] = max(self.legacy[user], self.new.get(user, 0))
        return []


def _domain() -> FakeDirectory:
    d = FakeDirectory()
    d.add_domain("old.example", migration_state="legacy", legacy_mailbox_host="imap.old.example")
    d.add_user("ann@old.example")
    d.add_user("ben@old.example")
    d.add_user("archive@old.example", account_status="archive")
    return d


def test_load_lists_subscribers_and_writes_the_state() -> None:
    d = _domain()
    mig = Migration.load(d, d, "old.example")
    assert mig.users == ["ann@old.example", "ben@old.example"]  # never the archive mailbox
    assert mig.state == "legacy" and mig.legacy_host() == "imap.old.example"
    mig.set_state("syncing")
    assert Migration.load(d, d, "old.example").state == "syncing"
    with pytest.raises(MigrationError, match="no such domain"):
        Migration.load(d, d, "nowhere.example")


def test_copy_records_each_user_and_goes_on_after_a_failure() -> None:
    d = _domain()
    mig = Migration.load(d, d, "old.example")
    boxes = FakeMailboxes({"ann@old.example": 5, "ben@old.example": 3}, {}, broken={"ann@old.example"})
    seen: list[str] = []
    results = mig.copy(boxes, "sync", progress=lambda r: seen.append(r.user))
    assert seen == ["ann@old.example", "ben@old.example"]
    ann, ben = results
    assert not ann.ok and "connection refused" in ann.error
    assert ben.ok and ben.copied == 3 and ben.target_after == 3
    # A second run copies nothing.
    again = mig.copy(boxes, "sync", ["ben@old.example"])[0]
    assert again.ok and again.copied == 0
    # One-way copies keep what only the target holds.
    boxes.new["ben@old.example"] = 4
    back = mig.copy(boxes, "push", ["ben@old.example"])[0]
    assert back.ok and back.copied == 1 and boxes.legacy["ben@old.example"] == 4


def test_an_unknown_stored_state_is_an_error_not_a_guess() -> None:
    d = FakeDirectory()
    d.add_domain("odd.example", migration_state="half-way")
    with pytest.raises(MigrationError, match="not one of legacy, syncing, migrated"):
        _ = Migration.load(d, d, "odd.example").state


def test_catch_up_continues_from_the_last_state_and_a_sync_starts_afresh(tmp_path: Path) -> None:
    d = _domain()
    mig = Migration.load(d, d, "old.example", state_dir=tmp_path)
    boxes = FakeMailboxes({"ann@old.example": 2, "ben@old.example": 1}, {})
    mig.copy(boxes, "catch-up", ["ann@old.example"])
    boxes.legacy["ann@old.example"] = 3
    mig.copy(boxes, "catch-up", ["ann@old.example"])
    mig.copy(boxes, "sync", ["ann@old.example"])
    mig.copy(boxes, "catch-up", ["ann@old.example"])
    assert boxes.states == [("ann@old.example", False, ""), ("ann@old.example", False, "seen-2"),
                            ("ann@old.example", True, ""), ("ann@old.example", False, "")]
    assert (tmp_path / "old.example" / "ann@old.example.dsync").read_text() == "seen-3\n"


def test_an_exact_copy_of_a_source_that_changed_meanwhile_is_not_judged_by_counts() -> None:
    assert not UserCopy("a@x.example", source_before=5, source_after=5, target_after=4).ok
    assert UserCopy("a@x.example", source_before=5, source_after=6, target_after=5).ok
    assert not UserCopy("a@x.example", source_before=5, source_after=6, target_after=5, error="x").ok
    # One-way (catch-up): the target must hold what the source held; a message arriving on
    # the source after the copy is left to the next catch-up.
    assert UserCopy("a@x.example", source_before=44, source_after=44, target_after=45, exact=False).ok
    assert not UserCopy("a@x.example", source_before=44, source_after=44, target_after=43, exact=False).ok
    assert UserCopy("a@x.example", source_before=43, source_after=44, target_after=43, exact=False).ok
    assert not UserCopy("a@x.example", source_before=43, source_after=44, target_after=42, exact=False).ok


def test_a_dsync_that_says_run_again_is_run_again_with_its_state(tmp_path: Path) -> None:
    """dsync exits 2 when the mailbox changed while it ran (mail arriving): the copy is
    repeated from the state it printed, and only a lasting failure is an error."""
    log = tmp_path / "calls"
    script = tmp_path / "doveadm"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {log}
n=$(wc -l < {log})
case "$*" in *fail*) echo "Error: it broke" >&2; exit 75 ;; esac
if [ "$n" -lt 2 ]; then echo "state-$n"; echo "Warning: Mailbox changes caused a desync" >&2; exit 2; fi
echo "state-$n"
""")
    script.chmod(0o755)
    boxes = DoveadmMailboxes(LegacyServer("192.0.2.1", 143, "migrate", "pw"), doveadm=str(script))
    assert boxes.pull("ann@old.example", exact=False, state="start") == "state-2"
    calls = log.read_text().splitlines()
    assert "-s start -u ann@old.example imapc:" in calls[0] and "-s state-1 -u" in calls[1]
    assert "imapc_user=ann@old.example" in calls[0] and "imapc_master_user=migrate" in calls[0]
    with pytest.raises(MigrationError, match="backup exited 75: Error: it broke"):
        boxes.pull("fail@old.example", exact=True)


def test_a_legacy_mailbox_host_with_a_port_is_refused() -> None:
    host = SETTINGS["legacy_mailbox_host"]
    assert host.parse(["IMAP.old.example"]) == "imap.old.example"
    assert host.parse(["192.0.2.7"]) == "192.0.2.7"
    for value in ("imap.old.example:110", "192.0.2.7:143", "[192.0.2.7]"):
        with pytest.raises(InvalidValue, match=r"ports come from render\.legacy_pop3_port"):
            host.parse([value])
    # A stored value with a port stops a copy with that reason, before doveadm runs.
    d = FakeDirectory()
    d.add_domain("old.example", migration_state="legacy", legacy_mailbox_host="imap.old.example:143")
    with pytest.raises(MigrationError, match=r"old\.example: legacy_mailbox_host: .* has a port"):
        Migration.load(d, d, "old.example").legacy_host()


def test_a_copy_keeping_pop3_uidls_reads_them_with_pop3c_and_the_plugin(tmp_path: Path) -> None:
    """With a legacy POP3 port, dsync runs with a configuration that includes the host's
    own and adds the pop3_migration plugin and its hidden pop3c namespace; counting and
    the copy back never connect to POP3."""
    log = tmp_path / "calls"
    script = tmp_path / "doveadm"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = -c ]; then cat "$2" >> {log}; fi
echo "messages=0"
""")
    script.chmod(0o755)
    host_conf = tmp_path / "dovecot.conf"
    legacy = LegacyServer("192.0.2.1", 143, "migrate", "pw", pop3_port=110)
    boxes = DoveadmMailboxes(legacy, config=str(host_conf), doveadm=str(script))
    boxes.pull("ann@old.example", exact=True)
    text = log.read_text()
    assert f"!include {host_conf}" in text and "mail_plugins = $mail_plugins pop3_migration" in text
    assert "location = pop3c:" in text and "pop3_migration_mailbox = POP3-MIGRATION-NS/INBOX" in text
    for option in ("pop3c_host=192.0.2.1", "pop3c_port=110", "pop3c_user=ann@old.example",
                   "pop3c_master_user=migrate", "imapc_port=143"):
        assert option in text
    log.unlink()
    boxes.count("ann@old.example", legacy=True)
    assert "pop3c" not in log.read_text() and f"-c {host_conf}" in log.read_text()
    log.unlink()
    DoveadmMailboxes(LegacyServer("192.0.2.1", 143, "migrate", "pw"), config=str(host_conf),
                     doveadm=str(script)).pull("ann@old.example", exact=True)
    assert "pop3c" not in log.read_text()


def test_a_pop3_listing_that_missed_new_mail_is_taken_again(tmp_path: Path) -> None:
    """While mail flows, a message may reach the legacy mailbox between the POP3 listing and
    the IMAP sync; dsync then fails for want of its UIDL, and a fresh run lists it."""
    log = tmp_path / "calls"
    script = tmp_path / "doveadm"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {log}
n=$(wc -l < {log})
if [ "$n" -lt 2 ]; then
  e="Error: Exporting mailbox INBOX failed: Can't lookup pop3-uidl for UID=35"
  echo "dsync(ann): $e: POP3 UIDLs couldn't be synced" >&2
  exit 75
fi
case "$*" in *other*) echo "Error: Exporting mailbox INBOX failed: disk full" >&2; exit 75 ;; esac
""")
    script.chmod(0o755)
    boxes = DoveadmMailboxes(LegacyServer("192.0.2.1", 143, "migrate", "pw", pop3_port=110),
                             doveadm=str(script))
    boxes.pull("ann@old.example", exact=True)
    assert len(log.read_text().splitlines()) == 2
    # Any other failure is not repeated.
    with pytest.raises(MigrationError, match="disk full"):
        boxes.pull("other@old.example", exact=True)
    assert len(log.read_text().splitlines()) == 3
