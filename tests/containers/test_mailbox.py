"""The mailbox hosts: quota at RCPT, forwarding and vacation from LDAP through Sieve."""

from __future__ import annotations

import re
import time

from harness.containers import MailStack, read_maildir
from mailwarden.render import FORWARD_DOMAIN
from tests.containers.conftest import DirectoryChanges

MX = "mx.mailwarden.test"  # the balancer


def test_over_quota_recipient_gets_552_at_rcpt(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    # nobody@bare.example.net has no quota yet: one 4 KB message, then a 1000-byte quota.
    first = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                        "--to", "nobody@bare.example.net", "--header", f"Subject: fill {token}",
                        "--body", "x" * 4000)
    assert first.returncode == 0, first.stdout
    stack.wait_for_messages(stack.maildir("nobody@bare.example.net"), match=token)
    directory.set("user", "nobody@bare.example.net", "quota", "1000")

    front_log = stack.log_size("front")
    refused = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                          "--to", "nobody@bare.example.net", "--header", f"Subject: more {token}")
    assert refused.returncode == 24, refused.stdout  # every RCPT refused
    assert re.search(r"<\*\* 552 5\.2\.2 <nobody@bare\.example\.net>: .*Mailbox is full", refused.stdout)
    stack.wait_for_log("front", r"NOQUEUE: reject: RCPT from mx\.outside\.test\[[\d.]+\]: 552 5\.2\.2 "
                       r"<nobody@bare\.example\.net>: Recipient address rejected: Mailbox is full",
                       after=front_log)
    assert not stack.front_queue()
    assert len([m for m in read_maildir(stack.maildir("nobody@bare.example.net")) if token in str(m)]) == 1


def test_forwarding_keeps_a_copy_and_sends_one_to_the_forward_address(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    # hanako (mailbox host mbox2) forwards and keeps a copy (mwForwardKeepCopy TRUE).
    target = f"hanako-{token}@outside.test"
    directory.set("user", "hanako@example.jp", "forward_addresses", target)
    mbox2_log = stack.log_size("mbox2")
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "hanako@example.jp", "--header", f"Subject: forward me {token}")
    assert sent.returncode == 0, sent.stdout

    [copy] = stack.wait_for_messages(stack.maildir("hanako@example.jp"), match=token)
    assert any("by mbox2.example.jp with LMTP" in r for r in copy.get_all("Received", []))
    [forwarded] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=target)
    assert forwarded["Subject"] == f"forward me {token}"
    # Sieve redirects once to the subscriber's forwarding address, out through mbox2's own
    # Postfix to the front node, whose route stage expands it to every forward address.
    forwarding = f"hanako=example.jp@{FORWARD_DOMAIN}"
    stack.wait_for_log("mbox2", rf"to=<{re.escape(forwarding)}>, relay=mx\.mailwarden\.test\[[\d.]+\]:25, "
                       r".*status=sent", after=mbox2_log)
    stack.wait_for_log("mbox2", rf"redirect action: forwarded to <{re.escape(forwarding)}>", name="dovecot")
    stack.wait_queues_empty()


def test_vacation_answers_each_sender_once(stack: MailStack, token: str) -> None:
    # alice@example.com is on vacation (mwVacationActive TRUE, "Away until Monday").
    sender = f"asker-{token}@outside.test"
    for n in (1, 2):
        sent = stack.swaks("internet", "--server", MX, "--from", sender, "--to", "alice@example.com",
                           "--header", f"Subject: question {n} {token}")
        assert sent.returncode == 0, sent.stdout
    stack.wait_for_messages(stack.maildir("alice@example.com"), 2, match=token)
    [reply] = stack.wait_for_messages(stack.internet_maildir(), delivered_to=sender)
    assert reply["Subject"] == "Away until Monday"
    assert str(reply["Auto-Submitted"]).startswith("auto-replied")
    stack.wait_for_log("mbox1", rf"sent vacation response to <{re.escape(sender)}>", name="dovecot")
    stack.wait_for_log("mbox1", rf"discarded duplicate vacation response to <{re.escape(sender)}>",
                       name="dovecot")
    stack.wait_queues_empty()
    time.sleep(1)
    assert len([m for m in read_maildir(stack.internet_maildir())
                if sender in m.get_all("Delivered-To", [])]) == 1
