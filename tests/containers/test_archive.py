"""The archive in the stack: the front node's milter saves each copy in the archive
mailbox's Dovecot (IMAP MULTIAPPEND as the archive master user, on the mailbox host's
archive listener) before it accepts the message, and ``mailwarden archive
search`` on the front node finds it through the mailbox host's doveadm HTTP API.

example.com archives both ways into archive@example.com (ldap/sample.ldif), an
account with no mail_host, so on the default mailbox host (mbox1); example.jp does
not archive.  The archive mailbox is an sdbox on the shared volume.
"""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

from harness.containers import (
    ARCHIVE_IMAP_PORT,
    MAILBOX_PORTS,
    SAMPLE_PASSWORD,
    MailStack,
    message_text,
    read_maildir,
)
from harness.postfix import make_message
from milters.archive import HEADER_PREFIX
from tests.containers.conftest import DirectoryChanges
from tests.containers.test_inbound import MX, queued_as
from tests.containers.test_sender_auth import SIGNER, SUBMISSION

ARCHIVE = "archive@example.com"
MAILBOX_CONF = "/etc/dovecot-mailbox/dovecot.conf"  # as mw-init renders it on a mailbox host
LMTP = 24  # [render] mailbox_port: postfix-mailbox's deliveries


def archive_files(stack: MailStack, token: str) -> list[Path]:
    """The archive mailbox's message files (an sdbox on the shared volume: one file per
    copy) that hold ``token``."""
    mails = stack.volume_path("mail") / "example.com" / "archive" / "sdbox" / "mailboxes" / "INBOX"
    mails /= "dbox-Mails"
    return [f for f in mails.glob("u.*") if token.encode() in f.read_bytes()] if mails.is_dir() else []


def exported(stack: MailStack, token: str) -> list[EmailMessage]:
    """The copies with ``token`` as ``mailwarden archive export --out -`` on the front
    node writes them (an mbox on standard output, through the mailbox host's doveadm)."""
    done = stack.mailwarden("archive", "export", "example.com", "--out", "-")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "export.mbox").write_text(done.stdout)
        box = mailbox.mbox(Path(tmp) / "export.mbox", create=False)
        messages = [email.message_from_bytes(m.as_bytes(), _class=EmailMessage, policy=email.policy.default)
                    for m in box]
        box.close()
    return [m for m in messages if token in message_text(m)]


def archived(stack: MailStack, token: str, count: int = 1) -> list[EmailMessage]:
    """The archive's copies of the messages with ``token``, once ``count`` are there and
    every queue of the stack is empty (so no further copy is on its way)."""
    deadline = time.monotonic() + 30
    while len(archive_files(stack, token)) < count:
        assert time.monotonic() < deadline, f"{len(archive_files(stack, token))} of {count} copies\n" + \
            stack.log_tails("front", "mbox1", "mbox2", lines=25)
        time.sleep(0.3)
    stack.wait_queues_empty()
    return exported(stack, token)


def envelope(copy: EmailMessage, name: str) -> list[str]:
    """The values of one ``X-Mailwarden-Archive-NAME`` field of a copy."""
    return [str(v) for v in copy.get_all(HEADER_PREFIX + name, [])]


def search(stack: MailStack, domain: str, *args: str) -> list[dict[str, object]]:
    """``mailwarden archive search DOMAIN ARGS --json`` on the front node."""
    done = stack.mailwarden("archive", "search", domain, *args, "--json")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def milter_line(stack: MailStack, queue_id: str, after: int) -> str:
    """The milter's log line for the message the front node queued as ``queue_id``."""
    return stack.wait_for_log("front", rf"^.*{queue_id}: accept .*$", name="milter", after=after).group(0)


def test_inbound_mail_is_archived_once_with_every_envelope_recipient_and_found_by_its_bcc_recipient(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    # bob and carol are named in the header; alice, a Bcc recipient, is not (and her
    # vacation, which answers only mail addressed to her, stays silent).  carol has
    # greylisting, which lets this test's first attempt through with a delay of 0.
    directory.set("user", "carol@example.com", "greylist_delay", "0")
    named, bcc = ["bob@example.com", "carol@example.com"], "alice@example.com"
    sender = f"sender-{token}@outside.test"
    milter_log = stack.log_size("front", "milter")
    sent = stack.swaks("internet", "--server", MX, "--from", sender, "--to", ",".join([*named, bcc]),
                       "--header", f"To: {', '.join(named)}", "--header", f"Subject: minutes {token}")
    assert sent.returncode == 0, sent.stdout
    queue_id = queued_as(sent.stdout)
    assert f"archive={ARCHIVE}:ok" in milter_line(stack, queue_id, milter_log)

    for rcpt in [*named, bcc]:
        [delivered] = stack.wait_for_messages(stack.maildir(rcpt), match=token)
        assert not [name for name in delivered if name.startswith(HEADER_PREFIX)]
    [copy] = archived(stack, token)
    assert sorted(envelope(copy, "Recipient")) == sorted([*named, bcc])
    assert envelope(copy, "Sender") == [f"<{sender}>"]
    assert envelope(copy, "Direction") == ["inbound"] and envelope(copy, "Queue-Id") == [queue_id]
    assert envelope(copy, "Client")[0].startswith(f"{stack.ip('internet')} (mx.outside.test)")
    assert copy["To"] == ", ".join(named) and copy["Subject"] == f"minutes {token}"
    # Saved on the archive account's host, the default mailbox host, by the front node's
    # milter logged in as the master user (from a front node: proxy_networks), in plain
    # text on the private network (a front node's connection counts as secured there).
    fronts = "|".join(re.escape(stack.ip(host)) for host in ("front", "front2"))
    stack.wait_for_log("mbox1", rf"imap-login: Info: Login: user=<archive@example\.com>.*rip=(?:{fronts}),",
                       name="dovecot")

    # milter check --connect on the front node logs in for the archive mailbox the same way.
    checked = stack.mailwarden("milter", "check", "--connect", check=False)
    assert f"archive {ARCHIVE}: IMAP: mailwarden-archive logged in for {ARCHIVE} at " \
           f"mbox1.example.jp:{ARCHIVE_IMAP_PORT}\n" in checked.stdout, checked.stdout + checked.stderr

    # The front node asks mbox1's doveadm HTTP API; the Bcc recipient finds it.
    [found] = [row for row in search(stack, "example.com", "--to", bcc) if token in str(row["subject"])]
    assert found["recipients"] == sorted([*named, bcc]) and found["sender"] == sender
    assert found["direction"] == "inbound"


def test_a_subscribers_submission_to_the_internet_is_archived_as_outbound(
    stack: MailStack, token: str
) -> None:
    friend = f"friend-{token}@outside.test"
    message = make_message(SIGNER, [friend], subject=f"proposal {token}", body=f"As discussed. {token}\n")
    result = stack.send("balancer", SUBMISSION, SIGNER, [friend], message, source=stack.client_address(6),
                        login=(SIGNER, SAMPLE_PASSWORD), starttls=True)
    assert result.accepted, result
    stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=friend)

    [copy] = archived(stack, token)
    assert envelope(copy, "Direction") == ["outbound"]
    assert envelope(copy, "Recipient") == [friend] and envelope(copy, "Sender") == [f"<{SIGNER}>"]
    assert envelope(copy, "Login") == [SIGNER]
    assert "DKIM-Signature" not in copy  # the message as it arrived, before the milter signed it
    [found] = [row for row in search(stack, "example.com", "--from", SIGNER, "--to", friend)
               if token in str(row["subject"])]
    assert found["direction"] == "outbound"


@contextmanager
def dovecot_stopped(stack: MailStack, host: str) -> Iterator[None]:
    """``host``'s Dovecot stopped (LMTP, POP3, IMAP, doveadm), started again at the end."""
    stack.exec(host, "doveadm", "-c", MAILBOX_CONF, "stop")
    try:
        wait_until(stack, host, lambda: not stack.answers(host, LMTP), "LMTP still answers")
        yield
    finally:
        # mw-init started the first one; this one runs detached in the same container.
        stack.docker("exec", "-d", stack.container(host), "dovecot", "-F", "-c", MAILBOX_CONF)
        wait_until(stack, host, lambda: all(stack.answers(host, p) for p in MAILBOX_PORTS),
                   "Dovecot did not come back")


def wait_until(stack: MailStack, host: str, condition: Callable[[], bool], failure: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{host}: {failure}\n" + stack.log_tails(host)
        time.sleep(0.2)


def test_with_the_archive_down_the_sender_is_deferred_and_its_retry_is_delivered_and_archived(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    # The archive mailbox moves to mbox2 for this test, so that stopping its Dovecot
    # leaves mbox1 (bob's mailbox and the MX's quota-status) running.
    directory.set("user", ARCHIVE, "mail_host", "mbox2.example.jp")
    sender, rcpt = f"sender-{token}@outside.test", "bob@example.com"
    internet_log, milter_log = stack.log_size("internet"), stack.log_size("front", "milter")
    with dovecot_stopped(stack, "mbox2"):
        # The Internet host's Postfix is the sender: it queues the message and retries.
        sent = stack.swaks("internet", "--server", "127.0.0.1", "--from", sender, "--to", rcpt,
                           "--header", f"Subject: retried {token}")
        assert sent.returncode == 0, sent.stdout
        stack.wait_for_log("internet", rf"to=<{re.escape(rcpt)}>, relay=mx\.mailwarden\.test.*"
                           r"status=deferred \(host mx\.mailwarden\.test\[[\d.]+\] said: "
                           r"451 4\.7\.1 .*archive unavailable", after=internet_log)
        stack.wait_for_log("front", rf"archive copy for {re.escape(ARCHIVE)} failed \(tempfail\): "
                           rf"{re.escape(ARCHIVE)} at mbox2\.example\.jp:{ARCHIVE_IMAP_PORT}", name="milter",
                           after=milter_log)
        assert not [m for m in read_maildir(stack.maildir(rcpt)) if token in message_text(m)]
        assert not archive_files(stack, token)
    stack.exec("internet", "postqueue", "-f")
    stack.wait_for_messages(stack.maildir(rcpt), match=token)
    [copy] = archived(stack, token)
    assert envelope(copy, "Recipient") == [rcpt] and envelope(copy, "Sender") == [f"<{sender}>"]
    [delivered] = [m for m in read_maildir(stack.maildir(rcpt)) if token in message_text(m)]
    assert delivered["Subject"] == f"retried {token}"


def test_a_domain_without_the_archive_service_keeps_nothing(stack: MailStack, token: str) -> None:
    milter_log = stack.log_size("front", "milter")
    sent = stack.swaks("internet", "--server", MX, "--from", f"sender-{token}@outside.test",
                       "--to", "taro@example.jp", "--header", f"Subject: unarchived {token}")
    assert sent.returncode == 0, sent.stdout
    assert "archive=" not in milter_line(stack, queued_as(sent.stdout), milter_log)
    stack.wait_for_messages(stack.maildir("taro@example.jp"), match=token)
    stack.wait_queues_empty()
    assert not exported(stack, token) and not archive_files(stack, token)
    refused = stack.mailwarden("archive", "search", "example.jp", check=False)
    assert refused.returncode == 1 and "example.jp has no archive_address" in refused.stderr
