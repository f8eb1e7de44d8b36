"""The archive's plan and failure actions, over the fake directory (the real Dovecot
archive is in tests/render/test_archive.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.smtpsink import SmtpSink
from milters import protocol as p
from milters.archive import ArchiveCopy
from milters.archivestore import LmtpStore
from milters.filters import Envelope
from milters.lmtp import LmtpClient
from milters.verdict import Recipient, RecipientOutcome, Verdict
from tests.milter.helpers import Harness, drive, harness, make_message, sample_directory


def rig(tmp: Path, failure_action: str = "tempfail", lmtp_port: int = 0) -> Harness:
    """example.com archives both ways into archive@example.com, whose LMTP is at
    ``lmtp_port`` (default: down)."""
    d = sample_directory()
    d.entries["mwDomainName=example.com,ou=domains"].update(
        enabled_service=["virus-scan", "archive"], archive_address=["archive@example.com"],
        archive_failure_action=[failure_action])
    d.add_user("archive@example.com", account_status="archive",
               mail_host=f"127.0.0.1:{lmtp_port or free_port()}")
    return harness(tmp, "archive_timeout = 2\n", d)


def plan(h: Harness, sender: str, login: str, *recipients: str) -> list[ArchiveCopy]:
    async def run() -> list[ArchiveCopy]:
        resolver = h.service.resolver
        outcomes = [RecipientOutcome(Recipient(r, (), await resolver.lookup(r))) for r in recipients]
        envelope = Envelope(sender=sender, auth_login=login)
        assert h.service.archiver is not None
        return await h.service.archiver.plan(envelope, Verdict(outcomes))

    return asyncio.run(run())


def test_a_colleague_s_mail_is_one_copy_both_ways(tmp_path: Path) -> None:
    h = rig(tmp_path)
    [copy] = plan(h, "alice@example.com", "alice@example.com", "bob@example.com", "friend@remote.example")
    assert copy.address == "archive@example.com" and copy.direction == "inbound+outbound"
    assert copy.recipients == ["bob@example.com", "friend@remote.example"]
    # Inbound only: the other domain's recipient is not listed in example.com's archive.
    [inbound] = plan(h, "x@outside.test", "", "bob@example.com", "taro@example.jp")
    assert inbound.recipients == ["bob@example.com"] and inbound.direction == "inbound"
    assert plan(h, "x@outside.test", "", "taro@example.jp") == []


def test_archive_down_tempfails_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = rig(tmp_path)
    with caplog.at_level(logging.ERROR, logger="mailwarden.milter"):
        fed = h.feed(make_message(to="bob@example.com"), "x@outside.test", "bob@example.com",
                     "taro@example.jp")
    assert fed.rc == p.TEMPFAIL and fed.reply[0] == "451"
    assert "archive copy for archive@example.com failed (tempfail)" in caplog.text


def test_archive_down_with_accept_delivers_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = rig(tmp_path, "accept")
    with caplog.at_level(logging.INFO, logger="mailwarden.milter"):
        fed = h.feed(make_message(to="bob@example.com"), "x@outside.test", "bob@example.com")
    assert fed.rc == p.ACCEPT
    assert "archive=archive@example.com:failed" in caplog.text


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[LmtpClient]:
    """The LMTP sessions the archiver opens, in order."""
    sessions: list[LmtpClient] = []
    real_open = LmtpClient.open

    async def counted(host: str, port: int, timeout: float, name: str = "localhost") -> LmtpClient:
        client = await real_open(host, port, timeout, name)
        sessions.append(client)
        return client

    monkeypatch.setattr(LmtpClient, "open", counted)
    return sessions


def test_copies_share_one_lmtp_session_and_one_the_server_ended_is_replaced(
        tmp_path: Path, opened: list[LmtpClient]) -> None:
    with SmtpSink(lmtp=True) as sink:
        h = rig(tmp_path, lmtp_port=sink.port)
        assert h.service.archiver is not None
        assert isinstance(h.service.archiver.store, LmtpStore)
        sessions = h.service.archiver.store.sessions
        host = ("127.0.0.1", sink.port)

        async def archived(n: int) -> None:
            data = make_message(to="bob@example.com", subject=f"copy {n}").as_bytes()
            fed = await drive(h.service, data, "x@outside.test", ["bob@example.com"], f"Q{n}")
            assert fed.rc == p.ACCEPT

        async def run() -> None:
            # One event loop, as in the milter: its sessions stay open between messages.
            for n in range(3):
                await archived(n)
            assert len(opened) == 1
            # The server ends the idle session (it reads end of file and closes): the next
            # copy notices at its first reply and goes out on a new session.
            idle = sessions.take(host)
            assert idle is not None
            idle.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.1)
            sessions.give_back(host, idle)
            await archived(3)
            assert len(opened) == 2

        asyncio.run(run())
        copies = sink.wait_for(4)
        assert [m.message["Subject"] for m in copies] == [f"copy {n}" for n in range(4)]
        h.service.close()
        assert sessions.take(host) is None


def test_a_refused_copy_tempfails_and_its_session_takes_the_next(
        tmp_path: Path, opened: list[LmtpClient], caplog: pytest.LogCaptureFixture) -> None:
    full = {"archive@example.com": "452 4.2.2 Mailbox is full"}
    with SmtpSink(lmtp=True, reject_recipients=full) as sink:
        h = rig(tmp_path, lmtp_port=sink.port)

        async def run() -> tuple[int, int]:
            data = make_message(to="bob@example.com", subject="kept").as_bytes()
            refused = await drive(h.service, data, "x@outside.test", ["bob@example.com"], "Q1")
            sink.reject_recipients.clear()
            taken = await drive(h.service, data, "x@outside.test", ["bob@example.com"], "Q2")
            return refused.rc, taken.rc

        with caplog.at_level(logging.ERROR, logger="mailwarden.milter"):
            assert asyncio.run(run()) == (p.TEMPFAIL, p.ACCEPT)
        assert "archive@example.com at 127.0.0.1:" in caplog.text
        assert "refused: 452 4.2.2 Mailbox is full" in caplog.text
        assert len(opened) == 1 and len(sink.wait_for(1)) == 1
        h.service.close()
