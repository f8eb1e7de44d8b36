"""End to end: a sending Postfix -> the MX Postfix with the milter -> the mailbox host.

Real Postfix (two private instances), real clamd (local test signatures), real
spamd (shipped rules, network tests off), real slapd (sample data plus two
subscribers with deterministic spam outcomes), the milter as its own process.
The mailbox host is an SMTP sink, so each test can see exactly which copy
reached which recipient.  Postfix's re-injection smtpd runs without milters.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.clamd import EICAR, ClamdServer
from harness.postfix import PostfixInstance, SmtpResult, missing_postfix
from harness.slapd import SlapdServer, mailwarden_database
from harness.smtpsink import SinkMessage, SmtpSink
from harness.spamd import GTUBE, SpamdServer
from mailwarden.logfields import is_mwid
from tests.milter.conftest import MilterProcess, archive_section, base_sections, milter_behind_mx

pytestmark = [pytest.mark.e2e, pytest.mark.slapd,
              pytest.mark.skipif(missing_postfix() is not None, reason=str(missing_postfix()))]

DATA = Path(__file__).parent / "data"


class Stack:
    def __init__(self, sender: PostfixInstance, mx: PostfixInstance, milter: MilterProcess,
                 mailbox: SmtpSink, clamd: ClamdServer, archive: SmtpSink) -> None:
        self.sender, self.mx, self.milter, self.mailbox, self.clamd = sender, mx, milter, mailbox, clamd
        self.archive = archive
        """The LMTP service archive@example.com's copies go to (example.com archives)."""

    def send(self, message: EmailMessage, *recipients: str, sender: str = "someone@remote.example"
             ) -> SmtpResult:
        """Straight to the MX (so the SMTP reply can be checked)."""
        return self.mx.send(sender, list(recipients), message)

    def copies(self, count: int) -> list[SinkMessage]:
        """Wait for ``count`` delivered messages (notices, with the null sender, not counted)."""
        deadline = time.monotonic() + 20
        while len(self.mail()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.mail()) >= count, f"{len(self.mail())} of {count} messages delivered"
        return self.mail()

    def mail(self) -> list[SinkMessage]:
        return [m for m in self.mailbox.messages if m.envelope_sender]

    def notices(self) -> list[SinkMessage]:
        return [m for m in self.mailbox.messages if not m.envelope_sender]

    def mail_for(self, address: str) -> list[SinkMessage]:
        return [m for m in self.mail() if address in m.recipients]

    def copy_for(self, address: str) -> SinkMessage:
        found = self.mail_for(address)
        assert len(found) == 1, f"{address}: {len(found)} copies"
        return found[0]


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    server = SlapdServer([mailwarden_database(DATA / "e2e.ldif")]).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def stack(directory: SlapdServer, clamd: ClamdServer, spamd: SpamdServer) -> Iterator[Stack]:
    work = Path(tempfile.mkdtemp(prefix="mw-e2e-"))
    work.chmod(0o755)  # Postfix's smtpd (user postfix) connects to the milter socket here
    with SmtpSink() as mailbox, SmtpSink(lmtp=True) as archive:
        sections = (base_sections(ldap_uri=directory.uri, store_path=work / "state.sqlite3")
                    + archive_section(archive.port))
        milter, mx = milter_behind_mx(work, sections, "", relayhost=mailbox.relayhost,
                                      myhostname="mx.example.jp", clamd=clamd.unix_address,
                                      spamd=spamd.address)
        sender = PostfixInstance(main_cf={"relayhost": f"[127.0.0.1]:{mx.smtpd_port}",
                                          "mynetworks": "127.0.0.0/8"},
                                 myhostname="out.remote.example", syslog_name="postfix-sender").start()
        try:
            yield Stack(sender, mx, milter, mailbox, clamd, archive)
        finally:
            sender.cleanup()
            mx.cleanup()
            milter.stop()
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh(stack: Stack) -> Iterator[None]:
    stack.mailbox.clear()
    stack.archive.clear()
    yield
    if stack.clamd.pid is None:
        stack.clamd.start()


def message(body: str = "Hello, see you tomorrow.\n", subject: str = "meeting") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Someone <someone@remote.example>"
    msg["To"] = "list@example.jp"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def attach(msg: EmailMessage, data: bytes, filename: str) -> EmailMessage:
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    return msg


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------- viruses


@pytest.mark.parametrize("build", [
    pytest.param(lambda: message(body=EICAR.decode() + "\n"), id="plain-body"),
    pytest.param(lambda: attach(message(), EICAR, "eicar.com.txt"), id="base64-attachment"),
    pytest.param(lambda: attach(message(), zipped({"inner.zip": zipped({"eicar.txt": EICAR})}),
                                "outer.zip"), id="zip-in-zip"),
])
def test_eicar_is_refused_at_smtp_time(stack: Stack, build: object) -> None:
    result = stack.send(build(), "taro@example.jp")  # type: ignore[operator]
    assert result.data[0] == 550 and "virus Custom.Test.EICAR" in result.data[1]
    # example.jp tells the recipient and its admin (hanako), in Japanese, with the null sender.
    notices = stack.mailbox.wait_for(2, timeout=20)
    assert sorted(r for n in notices for r in n.recipients) == ["hanako@example.jp", "taro@example.jp"]
    assert all(n.envelope_sender == "" and n.header("Auto-Submitted") == "auto-generated" for n in notices)
    assert "ウイルス" in (notices[0].header("Subject") or "")
    assert stack.mail() == []


def test_virus_is_kept_from_the_scanned_recipient_only(stack: Stack) -> None:
    result = stack.send(attach(message(), EICAR, "eicar.com.txt"), "taro@example.jp", "hanako@example.jp")
    assert result.accepted
    stack.copies(1)
    assert stack.copy_for("hanako@example.jp").recipients == ("hanako@example.jp",)  # no virus scan
    assert not stack.mail_for("taro@example.jp")


# ---------------------------------------------------------------- attachments


@pytest.mark.parametrize("filename", ["setup.exe", "screensaver.scr", "invoice.pdf.exe"])
def test_banned_attachment_names_are_refused(stack: Stack, filename: str) -> None:
    result = stack.send(attach(message(), b"not really a program", filename), "taro@example.jp")
    assert result.data[0] == 550 and filename in result.data[1]


def test_banned_attachment_is_stripped_where_the_domain_strips(stack: Stack) -> None:
    msg = attach(message(), b"not really a program", "invoice.pdf.exe")
    result = stack.send(msg, "taro@example.jp", "bob@example.com")
    assert result.accepted
    stack.copies(1)
    bob = stack.copy_for("bob@example.com").message
    assert [p.get_filename() for p in bob.walk() if p.get_filename()] == []
    assert any("invoice.pdf.exe" in p.get_content() and "removed" in p.get_content()
               for p in bob.walk() if p.get_content_type() == "text/plain")
    assert not stack.mail_for("taro@example.jp")


# ---------------------------------------------------------------- spam


def test_gtube_to_a_contracted_and_an_uncontracted_recipient(stack: Stack) -> None:
    result = stack.send(message(body=GTUBE + "\n"), "taro@example.jp", "bob@example.com")
    assert result.accepted
    stack.copies(1)
    bob = stack.copy_for("bob@example.com")
    assert bob.recipients == ("bob@example.com",)
    assert bob.header("X-Spam-Status") is None and bob.header("X-Spam-Flag") is None
    assert not stack.mail_for("taro@example.jp")  # over taro's reject score


def test_two_local_recipients_get_exactly_what_their_flags_say(stack: Stack) -> None:
    """junky (spam check, junk folder) and bob (no spam check) on one message: two copies."""
    result = stack.send(message(subject="quarterly report"), "junky@example.com", "bob@example.com",
                        "tagged@example.jp")
    assert result.accepted, stack.milter.log()[-3000:]
    stack.copies(3)
    junky, bob, tagged = (stack.copy_for(a) for a in ("junky@example.com", "bob@example.com",
                                                       "tagged@example.jp"))
    assert junky.recipients == ("junky@example.com",)
    assert junky.header("X-Mailwarden-Junk") == "yes" and junky.header("X-Spam-Flag") == "YES"
    assert junky.header("Subject") == "quarterly report"
    # The re-injected copy still shows how the message reached the MX.
    assert any(r.startswith("from client.mailwarden.test (unknown [127.0.0.1])") and "mx.example.jp" in r
               for r in junky.headers("Received"))
    assert tagged.header("Subject") == "[迷惑] quarterly report"
    assert tagged.header("X-Mailwarden-Junk") is None
    assert bob.header("Subject") == "quarterly report"
    ours = [h for h in bob.message if h.lower().startswith(("x-spam", "x-mailwarden"))]
    assert ours == ["X-Mailwarden-Id"]
    assert junky.header("X-Mailwarden-Id") == bob.header("X-Mailwarden-Id")  # one message, one id


def test_forged_spam_and_mailwarden_headers_leave_ham_for_everyone(stack: Stack) -> None:
    """A forged ``X-Spam-Flag: YES`` does not stay on ham for a spam-check subscriber
    (taro) nor for one without the service (bob): one copy, without any such field."""
    msg = message(subject="lunch")
    for name, value in (("X-Spam-Flag", "YES"), ("X-Spam-Status", "Yes, score=50.0"),
                        ("X-Mailwarden-Junk", "yes"), ("X-Mailwarden-Notice", "virus")):
        msg[name] = value
    result = stack.send(msg, "taro@example.jp", "bob@example.com")
    assert result.accepted, stack.milter.log()[-3000:]
    (copy,) = stack.copies(1)
    assert sorted(copy.recipients) == ["bob@example.com", "taro@example.jp"]
    ours = [h for h in copy.message if h.lower().startswith(("x-spam", "x-mailwarden"))]
    assert ours == ["X-Mailwarden-Id"]
    assert is_mwid(copy.header("X-Mailwarden-Id") or "")
    assert copy.header("Subject") == "lunch"


# ---------------------------------------------------------------- keywords


def test_keyword_hit_for_one_of_two_recipients(stack: Stack) -> None:
    result = stack.send(message(body="Buy cheap   pills today\n"), "taro@example.jp", "bob@example.com")
    assert result.accepted
    stack.copies(1)
    assert stack.copy_for("bob@example.com").recipients == ("bob@example.com",)
    assert not stack.mail_for("taro@example.jp")
    line = stack.milter.wait_for_log("taro@example.jp=reject[keyword rule")
    assert "bob@example.com=deliver" in line


# ---------------------------------------------------------------- outages


def test_clamd_down_defers_and_the_retry_is_delivered(stack: Stack) -> None:
    stack.clamd.stop()
    since = stack.sender.log_offset()
    stack.sender.send("someone@remote.example", ["taro@example.jp"], message(body="while clamd is down\n"))
    stack.sender.wait_for_log(r"status=deferred .*451 4\.7\.1", timeout=20, since=since)
    assert stack.mail() == []
    stack.clamd.start()
    stack.sender.wait_queue_empty(timeout=30)
    stack.mx.wait_queue_empty(timeout=30)
    (copy,) = stack.copies(1)
    assert copy.recipients == ("taro@example.jp",) and b"while clamd is down" in copy.data


# ---------------------------------------------------------------- several worker processes


def test_two_workers_share_the_socket_and_filter_alike(stack: Stack) -> None:
    """``workers = 2``: two processes on one socket, each deciding what it accepts."""
    work = stack.milter.dir.parent / "milter-workers"
    pair = MilterProcess(work, "", "")
    config = stack.milter.config_path.read_text().replace(str(stack.milter.dir), str(work))
    pair.config_path.write_text(config + "workers = 2\n")
    pair.start()
    stack.mx.postconf(smtpd_milters=f"unix:{pair.socket_path}")
    stack.mx.restart()
    try:
        started = pair.wait_for_log("2 workers started")
        pids = started.rsplit("(pids ", 1)[1].rstrip(")").split()
        assert len(set(pids)) == 2
        refused = stack.send(message(body=EICAR.decode() + "\n"), "bob@example.com")
        assert refused.data[0] == 550 and "virus Custom.Test.EICAR" in refused.data[1]
        tagged = stack.send(message(subject="quarterly report"), "tagged@example.jp")
        assert tagged.accepted
        assert stack.copies(1)[0].header("Subject") == "[迷惑] quarterly report"
        line = pair.wait_for_log("tagged@example.jp=")
        assert any(f"[{pid}]" in line for pid in pids)
    finally:
        stack.mx.postconf(smtpd_milters=f"unix:{stack.milter.socket_path}")
        stack.mx.restart()
        pair.stop()


# ---------------------------------------------------------------- archive


def test_an_archiving_domain_keeps_one_copy_with_its_bcc_recipients(stack: Stack) -> None:
    """Through the real Postfix: example.com archives into archive@example.com, whose
    LMTP (a sink here) took the copy before the MX answered; alice is a Bcc recipient."""
    result = stack.send(message(subject="board minutes"), "bob@example.com", "carol@example.com",
                        "alice@example.com", "taro@example.jp")
    assert result.accepted
    [kept] = stack.archive.messages
    assert kept.recipients == ("archive@example.com",) and kept.envelope_sender == "someone@remote.example"
    fields = kept.message
    assert fields.get_all("X-Mailwarden-Archive-Recipient") == [
        "bob@example.com", "carol@example.com", "alice@example.com"]
    assert fields["X-Mailwarden-Archive-Direction"] == "inbound" and fields["Subject"] == "board minutes"
    assert fields["X-Mailwarden-Archive-Queue-Id"] != "NOQUEUE"
    assert fields["X-Mailwarden-Archive-Id"] and fields["X-Mailwarden-Archive-Id"] in stack.milter.log()
    [delivered] = stack.copies(1)  # after it was archived; the archive's fields are not in it
    assert set(delivered.recipients) == {"alice@example.com", "bob@example.com", "carol@example.com",
                                         "taro@example.jp"}
    assert "X-Mailwarden-Archive-Recipient" not in delivered.message
