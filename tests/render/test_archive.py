"""The archive against the real Dovecot of a rendered mailbox host and the sample directory.

The milter (its real LDAP resolver, fake scanners) saves each copy with IMAP MULTIAPPEND
as the rendered master user (LMTP where no archive IMAP port is set);
``mailwarden archive search / export / expire`` ask Dovecot through its doveadm HTTP
API.  example.com archives both ways into archive@example.com (sample data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import imaplib
import json
import logging
import mailbox
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import ldap
from harness.ports import free_port
from harness.slapd import SlapdServer
from mailwarden.cli.common import App
from mailwarden.config import Config, ConfigError
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import PolicyResolver
from mailwarden.store import MemoryStore
from milters import protocol as p
from milters.archive_cli import archive_group
from milters.archivestore import ArchiveUnavailable, ImapStore, LmtpStore
from milters.service import MilterService, build_service
from milters.signing import generate_key, write_new_key
from tests.conftest import ADMIN_DN
from tests.milter.helpers import (
    FakeSpamScanner,
    FakeVirusScanner,
    Fed,
    RecordingInjector,
    drive,
    make_message,
)
from tests.render.conftest import (
    RenderedDovecot,
    RenderedPostfix,
    Site,
    ldap_toml,
    need_dovecot,
    need_postfix,
    site_root,
)

EXAMPLE_COM = "mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test"
MASTER_PASSWORD = "archive-master-test"


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    """A slapd of the module's own: example.com keeps its archive for 5 days here."""
    from tests.conftest import new_slapd

    server = new_slapd()
    conn = ldap.initialize(server.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    conn.modify_s(EXAMPLE_COM, [(ldap.MOD_ADD, "mwArchiveRetention", [b"5"])])
    conn.unbind_s()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def archive_host(directory: SlapdServer) -> Iterator[tuple[Site, RenderedDovecot]]:
    """The rendered mailbox role with the doveadm HTTP API on; subscribers without a
    mailbox host (the archive mailbox among them) live on it."""
    need_dovecot()
    with site_root() as root:
        key = root / "doveadm.key"
        key.write_text("archive-test-key\n")
        master = root / "archive-master.key"
        master.write_text(MASTER_PASSWORD + "\n")
        port, imap = free_port(), free_port()
        site = Site(root, ldap_toml(directory), extra=(
            f'doveadm_http_port = {port}\ndoveadm_api_key_file = "{key}"\n'
            f'archive_imap_port = {imap}\narchive_master_password_file = "{master}"\n'
            'default_mailbox_host = "127.0.0.1"\n'))
        site.ports["doveadm"] = port
        site.ports["archive_imap"] = imap
        # example.com signs what alice sends: its key.
        private, _ = generate_key("rsa")
        write_new_key(root / "dkim" / "example.com.mw2026.key", private)
        site.text = site.text.replace("[milter]\n", f'[milter]\nsender_auth = false\n'
                                      f'dkim_key_path = "{root}/dkim/{{domain}}.{{selector}}.key"\n', 1)
        site.dovecot("mailbox")
        dovecot = RenderedDovecot(site, "mailbox")
        dovecot.start(site.ports["lmtp"], port, imap)
        try:
            yield site, dovecot
        finally:
            dovecot.stop()


def service(config: Config) -> MilterService:
    return build_service(config, store=MemoryStore(), virus_scanner=FakeVirusScanner(),
                         spam_scanner=FakeSpamScanner(), injector=RecordingInjector(),
                         resolver=PolicyResolver(LdapDirectory(config.ldap), config))


def send(svc: MilterService, data: bytes, sender: str, *recipients: str, login: str = "",
         queue_id: str = "QA1") -> Fed:
    return asyncio.run(drive(svc, data, sender, recipients, queue_id, login=login))


def archive(site: Site, *args: str) -> Result:
    return CliRunner().invoke(archive_group, list(args), obj=App(str(site.write())))


def found(site: Site, *args: str) -> list[dict[str, object]]:
    result = archive(site, "search", "example.com", "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_inbound_mail_is_archived_once_with_every_envelope_recipient(
        archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    svc = service(site.config)
    # alice is a Bcc recipient: no header names her.
    forged = {"X-Mailwarden-Archive-Recipient": "forged@example.com"}
    msg = make_message(sender="news@outside.test", to="bob@example.com", subject="quarterly figures",
                       headers={"Cc": "carol@example.com", **forged})
    fed = send(svc, msg.as_bytes(), "news@outside.test", "bob@example.com", "carol@example.com",
               "alice@example.com", "taro@example.jp")
    assert fed.rc == p.ACCEPT
    [hit] = found(site, "--to", "alice@example.com")
    assert hit["recipients"] == ["alice@example.com", "bob@example.com", "carol@example.com"]
    assert hit["sender"] == "news@outside.test" and hit["subject"] == "quarterly figures"
    assert hit["direction"] == "inbound"
    # Exact addresses: a substring of one is not a match, nor a forged field.
    assert found(site, "--to", "lice@example.com") == []
    assert found(site, "--to", "forged@example.com") == []
    # taro's domain does not archive: example.jp's recipient is not listed.
    assert found(site, "--to", "taro@example.jp") == []


def test_outbound_mail_of_an_archiving_subscriber_is_archived(archive_host: tuple[Site, RenderedDovecot],
                                                              tmp_path: Path) -> None:
    site, _ = archive_host
    msg = make_message(sender="alice@example.com", to="friend@remote.example", subject="offer")
    fed = send(service(site.config), msg.as_bytes(), "alice@example.com", "friend@remote.example",
               "hidden@remote.example", login="alice@example.com", queue_id="QA2")
    assert fed.rc == p.ACCEPT
    [hit] = found(site, "--from", "alice@example.com", "--to", "hidden@remote.example")
    assert hit["direction"] == "outbound"
    assert hit["recipients"] == ["friend@remote.example", "hidden@remote.example"]
    # Export as mbox and as .eml: the message with its envelope fields.
    out = tmp_path / "export.mbox"
    exported = archive(site, "export", "example.com", "--from", "alice@example.com", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    [kept] = list(mailbox.mbox(out))
    assert kept["Subject"] == "offer"
    assert kept.get_all("X-Mailwarden-Archive-Recipient") == hit["recipients"]
    assert kept["X-Mailwarden-Archive-Login"] == "alice@example.com"
    assert kept["X-Mailwarden-Archive-Queue-Id"] == "QA2"
    # To standard output: the same mbox, the count on standard error.
    piped = archive(site, "export", "example.com", "--from", "alice@example.com", "--out", "-")
    assert piped.exit_code == 0, piped.output
    assert piped.stdout_bytes.startswith(b"From ") and b"Subject: offer" in piped.stdout_bytes
    assert piped.stdout_bytes.count(b"\nFrom ") == 0 and "1 message(s)" in piped.stderr
    emls = tmp_path / "eml"
    assert archive(site, "export", "example.com", "--to", "hidden@remote.example", "--format", "eml",
                   "--out", str(emls)).exit_code == 0
    [eml] = list(emls.iterdir())
    assert b"Subject: offer" in eml.read_bytes()


def with_render(config: Config, **changes: object) -> Config:
    return dataclasses.replace(config, render=dataclasses.replace(config.render, **changes))


def test_archive_down_defers_the_message_until_it_is_back(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    dead = with_render(site.config, archive_imap_port=free_port())
    msg = make_message(sender="boss@outside.test", to="bob@example.com", subject="retry me")
    deferred = send(service(dead), msg.as_bytes(), "boss@outside.test", "bob@example.com", queue_id="QA3")
    assert deferred.rc == p.TEMPFAIL and deferred.reply[0] == "451"
    assert "archive unavailable" in deferred.reply[2]
    assert found(site, "--from", "boss@outside.test") == []
    # The sender retries once the archive is back: delivered and archived, once.
    again = send(service(site.config), msg.as_bytes(), "boss@outside.test", "bob@example.com", queue_id="QA4")
    assert again.rc == p.ACCEPT
    assert len(found(site, "--from", "boss@outside.test")) == 1


def test_a_domain_without_archiving_keeps_nothing(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    before = found(site)
    msg = make_message(sender="x@outside.test", to="taro@example.jp", subject="not kept")
    assert send(service(site.config), msg.as_bytes(), "x@outside.test", "taro@example.jp").rc == p.ACCEPT
    assert found(site) == before
    assert archive(site, "search", "example.jp").exit_code != 0  # no archive_address there


def test_smtp_cannot_reach_the_archive_mailbox(archive_host: tuple[Site, RenderedDovecot]) -> None:
    """Postfix's recipient and routing tables leave archive accounts out (mail to one is
    refused as an unknown user); Dovecot's userdb, which LMTP uses, still has the user."""
    need_postfix()
    site, dovecot = archive_host
    site.postfix("route", "mailbox")
    route, mailbox_stage = RenderedPostfix(site, "route"), RenderedPostfix(site, "mailbox")
    assert route.lookup("ldap-recipients", "alice@example.com") == "alice@example.com"
    assert route.lookup("ldap-recipients", "archive@example.com") is None
    assert mailbox_stage.lookup("ldap-mailhost-users", "archive@example.com") is None
    assert dovecot.userdb("archive@example.com") is not None


def save_received(site: Site, data: bytes, received: float) -> None:
    """Save ``data`` in example.com's archive as if it had arrived at ``received`` (its
    IMAP internal date, which expire goes by), logged in as the milter does."""
    with imaplib.IMAP4("127.0.0.1", site.ports["archive_imap"]) as imap:
        auth = f"archive@example.com\0mailwarden-archive\0{MASTER_PASSWORD}".encode()
        imap.authenticate("PLAIN", lambda _: auth)
        status, _ = imap.append("INBOX", None, imaplib.Time2Internaldate(received), data)
        assert status == "OK"


def test_expire_removes_what_is_older_than_the_retention(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    msg = make_message(sender="young@outside.test", to="bob@example.com", subject="recent")
    assert send(service(site.config), msg.as_bytes(), "young@outside.test", "bob@example.com").rc == p.ACCEPT
    # The archive received this one a week ago.
    old = make_message(sender="old@outside.test", to="bob@example.com", subject="ancient")
    save_received(site, b"X-Mailwarden-Archive-Sender: <old@outside.test>\r\n" + old.as_bytes(),
                  time.time() - 7 * 86400)
    assert len(found(site, "--from", "old@outside.test")) == 1
    expired = archive(site, "expire", "example.com")
    assert expired.exit_code == 0, expired.output
    assert "1 message(s) older than 5 days removed" in expired.output
    assert found(site, "--from", "old@outside.test") == []
    assert found(site, "--from", "young@outside.test")  # younger mail stays


def test_expire_all_goes_through_every_archiving_domain_and_reports_the_one_it_cannot(
        archive_host: tuple[Site, RenderedDovecot], directory: SlapdServer) -> None:
    site, _ = archive_host
    msg = make_message(sender="older@outside.test", to="bob@example.com", subject="stale")
    save_received(site, b"X-Mailwarden-Archive-Sender: <older@outside.test>\r\n" + msg.as_bytes(),
                  time.time() - 7 * 86400)
    # example.jp names a subscriber's own mailbox as its archive: that one is refused.
    example_jp = EXAMPLE_COM.replace("example.com", "example.jp")
    conn = ldap.initialize(directory.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    conn.modify_s(example_jp, [(ldap.MOD_ADD, "mwArchiveAddress", [b"taro@example.jp"])])
    try:
        expired = archive(site, "expire", "--all")
    finally:
        conn.modify_s(example_jp, [(ldap.MOD_DELETE, "mwArchiveAddress", None)])
        conn.unbind_s()
    assert expired.exit_code == 1, expired.output
    assert "example.com: 1 message(s) older than 5 days removed from archive@example.com" in expired.stdout
    assert "example.jp: taro@example.jp is not an archive mailbox of example.jp" in expired.stderr
    assert found(site, "--from", "older@outside.test") == []
    assert archive(site, "expire").exit_code == 2
    assert archive(site, "expire", "--all", "example.com").exit_code == 2


def test_a_domain_the_caller_cannot_see_is_refused(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    unknown = archive(site, "search", "not-hosted.example")
    assert unknown.exit_code == 1 and "no such domain not-hosted.example" in unknown.output
    malformed = archive(site, "search", "bad domain")
    assert malformed.exit_code == 2 and "@" not in malformed.output
    # Another domain's mailbox, or a subscriber's own, is not this domain's archive.
    for mailbox_ in ("taro@example.jp", "bob@example.com"):
        borrowed = archive(site, "search", "example.com", "--archive", mailbox_)
        assert borrowed.exit_code == 1 and "is not an archive mailbox of example.com" in borrowed.output


def test_without_an_archive_imap_port_copies_go_over_lmtp(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    lmtp_only = with_render(site.config, archive_imap_port=0)
    svc = service(lmtp_only)
    assert isinstance(svc.archiver.store, LmtpStore) if svc.archiver else False
    msg = make_message(sender="lmtp@outside.test", to="bob@example.com", subject="over lmtp")
    assert send(svc, msg.as_bytes(), "lmtp@outside.test", "bob@example.com", queue_id="QL1").rc == p.ACCEPT
    [hit] = found(site, "--from", "lmtp@outside.test")
    assert hit["recipients"] == ["bob@example.com"]


def test_copies_arriving_together_share_one_session_and_few_commands(
        archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    svc = service(site.config)
    assert svc.archiver is not None and isinstance(svc.archiver.store, ImapStore)
    store = svc.archiver.store

    async def run() -> list[Fed]:
        # One event loop, as in the milter: 20 messages in flight at once.
        return await asyncio.gather(*(
            drive(svc, make_message(sender="burst@outside.test", to="bob@example.com",
                                    subject=f"burst {n}").as_bytes(),
                  "burst@outside.test", ["bob@example.com"], f"QB{n}") for n in range(20)))

    fed = asyncio.run(run())
    assert all(f.rc == p.ACCEPT for f in fed)
    hits = found(site, "--from", "burst@outside.test")
    assert sorted(str(h["subject"]) for h in hits) == sorted(f"burst {n}" for n in range(20))
    # One login; the copies waiting while a command was out went together in the next.
    assert store.opened == store.lanes == 1
    assert store.commands < 20


@pytest.fixture
def small_archive_quota(archive_host: tuple[Site, RenderedDovecot], directory: SlapdServer) -> Iterator[None]:
    """archive@example.com may hold 1 MB for the length of a test."""
    _, dovecot = archive_host
    conn = ldap.initialize(directory.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    [(dn, _)] = conn.search_s("dc=mailwarden,dc=test", ldap.SCOPE_SUBTREE, "(mail=archive@example.com)",
                              ["mail"])
    conn.modify_s(dn, [(ldap.MOD_ADD, "mwQuota", [b"1000000"])])
    dovecot.doveadm("auth", "cache", "flush")
    try:
        yield
    finally:
        conn.modify_s(dn, [(ldap.MOD_DELETE, "mwQuota", None)])
        conn.unbind_s()
        dovecot.doveadm("auth", "cache", "flush")


def test_a_refused_batch_is_saved_copy_by_copy(archive_host: tuple[Site, RenderedDovecot],
                                               small_archive_quota: None) -> None:
    """MULTIAPPEND is all or nothing: Dovecot refuses a batch holding a copy over the
    mailbox's quota, and the other copies of that batch are then saved one by one."""
    site, _ = archive_host
    store = ImapStore(site.ports["archive_imap"], "mailwarden-archive", MASTER_PASSWORD, 5)

    def copy(subject: str, body: str = "hello\n") -> bytes:
        envelope = b"X-Mailwarden-Archive-Sender: <batch@outside.test>\r\n"
        return envelope + make_message(sender="batch@outside.test", to="bob@example.com", subject=subject,
                                       body=body).as_bytes()

    async def run() -> list[BaseException | None]:
        good = [copy(f"batch {n}") for n in range(3)]
        big = copy("too big", ("y" * 76 + "\n") * 30000)
        deadline = time.monotonic() + 10
        saves = [store.save("127.0.0.1", "archive@example.com", data, "", deadline)
                 for data in (good[0], big, good[1], good[2])]
        results = await asyncio.gather(*saves, return_exceptions=True)
        store.close()
        return results

    first, big, *rest = asyncio.run(run())
    assert first is None and rest == [None, None]
    assert isinstance(big, ArchiveUnavailable) and "OVERQUOTA" in str(big)
    assert store.commands >= 4  # the batch, then each copy alone
    assert sorted(str(h["subject"]) for h in found(site, "--from", "batch@outside.test")) == \
        ["batch 0", "batch 1", "batch 2"]


def test_a_session_dovecot_ended_is_replaced_for_the_next_copy(
        archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, dovecot = archive_host
    store = ImapStore(site.ports["archive_imap"], "mailwarden-archive", MASTER_PASSWORD, 5)

    async def run() -> None:
        deadline = time.monotonic() + 10
        copy = make_message(sender="kick@outside.test", to="bob@example.com", subject="before").as_bytes()
        await store.save("127.0.0.1", "archive@example.com", copy, "", deadline)
        # Dovecot ends the idle session (as at a restart, or after its autologout).
        kicked = dovecot.doveadm("kick", "archive@example.com")
        assert kicked.returncode == 0, kicked.stderr
        await asyncio.sleep(0.2)
        copy = make_message(sender="kick@outside.test", to="bob@example.com", subject="after").as_bytes()
        await store.save("127.0.0.1", "archive@example.com", copy, "", deadline)
        store.close()

    asyncio.run(run())
    assert store.opened == 2 and store.commands == 3  # the second copy went out once more


def test_the_archive_mailbox_is_an_sdbox_with_its_own_quota_and_syncs(
        archive_host: tuple[Site, RenderedDovecot], directory: SlapdServer) -> None:
    """The archive account alone is an sdbox (one file per copy, named by its UID) with its
    quota counted in its index and its indexes not synced; subscribers keep their Maildir,
    Maildir++ quota and every sync."""
    site, dovecot = archive_host
    archive_fields = dovecot.userdb("archive@example.com")
    assert archive_fields is not None
    assert archive_fields["mail"] == "sdbox:~/sdbox:INDEX=~/sdbox"
    assert archive_fields["quota"] == "count:User quota" and archive_fields["quota_vsizes"] == "yes"
    assert archive_fields["mail_fsync"] == "optimized"
    # A subscriber with an account status of another value gets the role's own settings.
    bob_dn = "uid=bob,ou=users," + EXAMPLE_COM
    conn = ldap.initialize(directory.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    conn.modify_s(bob_dn, [(ldap.MOD_ADD, "mwAccountStatus", [b"active"])])
    dovecot.doveadm("auth", "cache", "flush")
    try:
        bob = dovecot.userdb("bob@example.com")
    finally:
        conn.modify_s(bob_dn, [(ldap.MOD_DELETE, "mwAccountStatus", None)])
        conn.unbind_s()
        dovecot.doveadm("auth", "cache", "flush")
    assert bob is not None
    assert bob["mail"] == f"maildir:~/Maildir:INDEX={site.root}/index/example.com/bob"
    assert bob["quota"] == "maildir:User quota" and bob["quota_vsizes"] == "no"
    assert bob["mail_fsync"] == "always"
    msg = make_message(sender="fmt@outside.test", to="bob@example.com", subject="one file")
    assert send(service(site.config), msg.as_bytes(), "fmt@outside.test", "bob@example.com").rc == p.ACCEPT
    mails = site.root / "mail" / "example.com" / "archive" / "sdbox" / "mailboxes" / "INBOX" / "dbox-Mails"
    assert [f for f in mails.glob("u.*") if b"Subject: one file" in f.read_bytes()]
    assert not (site.root / "mail" / "example.com" / "archive" / "Maildir").exists()


def milter_check(config: Path) -> Result:
    from mailwarden.cli import main

    return CliRunner().invoke(main, ["--config", str(config), "milter", "check", "--connect"])


def test_milter_check_logs_in_to_each_archive_mailbox(archive_host: tuple[Site, RenderedDovecot]) -> None:
    site, _ = archive_host
    checked = milter_check(site.write())
    port = site.ports["archive_imap"]
    assert f"archive archive@example.com: IMAP: mailwarden-archive logged in for archive@example.com at " \
           f"127.0.0.1:{port}\n" in checked.output


def test_an_archive_kept_in_a_maildir_is_imported_into_the_sdbox(
        archive_host: tuple[Site, RenderedDovecot]) -> None:
    """What docs/templates.md gives for moving an archive out of a Maildir (one kept with
    ``archive_mailbox_format = "maildir"``): ``doveadm import`` into the sdbox."""
    site, dovecot = archive_host
    fields = dovecot.userdb("archive@example.com")
    assert fields is not None
    maildir = Path(fields["home"]) / "Maildir"
    msg = make_message(sender="kept@outside.test", to="bob@example.com", subject="from the maildir")
    mailbox.Maildir(maildir, create=True).add(b"X-Mailwarden-Archive-Sender: <kept@outside.test>\r\n"
                                              + msg.as_bytes())
    for path in [maildir, *maildir.rglob("*")]:  # as the mail user's own files are
        os.chown(path, int(fields["uid"]), int(fields["gid"]))
    assert found(site, "--from", "kept@outside.test") == []
    imported = dovecot.doveadm("import", "-u", "archive@example.com", "maildir:~/Maildir", "", "all")
    assert imported.returncode == 0, imported.stderr
    [hit] = found(site, "--from", "kept@outside.test")
    assert hit["subject"] == "from the maildir"


# Last in the module: Dovecot delays logins from an address after failed ones (its auth
# penalty), which would slow the tests after this one.
def test_a_wrong_master_password_defers_and_the_master_user_cannot_log_in_as_itself(
        archive_host: tuple[Site, RenderedDovecot], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site, _ = archive_host
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not-the-password\n")
    svc = service(with_render(site.config, archive_master_password_file=str(wrong)))
    msg = make_message(sender="guess@outside.test", to="bob@example.com", subject="guessed")
    with caplog.at_level(logging.ERROR, logger="mailwarden.milter"):
        fed = send(svc, msg.as_bytes(), "guess@outside.test", "bob@example.com", queue_id="QW1")
    assert fed.rc == p.TEMPFAIL and "archive unavailable" in fed.reply[2]
    assert "login: M1 NO" in caplog.text and "AUTHENTICATIONFAILED" in caplog.text
    assert found(site, "--from", "guess@outside.test") == []
    # A master user opens other mailboxes only: as itself, IMAP refuses it.
    with imaplib.IMAP4("127.0.0.1", site.ports["archive_imap"]) as imap, \
            pytest.raises(imaplib.IMAP4.error):
        imap.login("mailwarden-archive", MASTER_PASSWORD)
    # milter check --connect names the refusal.
    wrong_config = tmp_path / "wrong.toml"
    wrong_config.write_text(site.text.replace(str(site.root / "archive-master.key"), str(wrong)))
    checked = milter_check(wrong_config)
    assert checked.exit_code == 75 and "archive archive@example.com: FAILED archive@example.com at " \
        in checked.output and "AUTHENTICATIONFAILED" in checked.output
    # An unreadable password file stops the milter from starting, with the setting named.
    with pytest.raises(ConfigError, match="archive_master_password_file"):
        service(with_render(site.config, archive_master_password_file=str(tmp_path / "missing")))

