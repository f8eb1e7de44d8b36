"""Sender authentication end to end: DKIM signing of submitted mail, verified on the
Internet host; DMARC of mail from the Internet, acted on per recipient domain.

The stack's DNS has what these need: the front node makes example.com's key at start
(``mailwarden dkim keygen``) and publishes its record through the dns host, and the
zone has ``bank.test``, a domain with ``p=reject`` that the Internet host may not send for.
"""

from __future__ import annotations

import json
import re

from harness.containers import INTERNET_MAIL, SAMPLE_PASSWORD, MailStack, message_text, read_maildir
from harness.postfix import make_message
from tests.containers.test_inbound import MX, queued_as

SUBMISSION = 587
SIGNER = "alice@example.com"  # example.com: dkim-signing, selector mw2026 (ldap/sample.ldif)
HONOURS, TAGS = "taro@example.jp", "prof@lab.example.org"  # dmarc_action honour (default) / tag


def received_on_the_internet_host(stack: MailStack, token: str) -> str:
    """The path, inside the Internet host, of the one message it received that has ``token``."""
    base = stack.internet_maildir()
    [path] = [p for p in base.glob("*/*") if token.encode() in p.read_bytes()]
    return f"{INTERNET_MAIL}/outside.test/{path.relative_to(base)}"


def test_a_signing_domains_submission_reaches_the_internet_host_with_a_signature_that_verifies_there(
    stack: MailStack, token: str
) -> None:
    # The key the front node made at start is the one the stack's DNS publishes.
    check = stack.mailwarden("dkim", "check", "example.com")
    assert "mw2026._domainkey.example.com: rsa-sha256 key published" in check.stdout

    friend = f"friend-{token}@outside.test"
    message = make_message(SIGNER, [friend], subject=f"quarterly figures {token}",
                           body=f"The figures are attached as agreed. {token}\n")
    result = stack.send("balancer", SUBMISSION, SIGNER, [friend], message, source=stack.client_address(5),
                        login=(SIGNER, SAMPLE_PASSWORD), starttls=True)
    assert result.auth == (235, "2.7.0 Authentication successful")
    assert result.accepted, result

    [received] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=friend)
    [signature] = received.get_all("DKIM-Signature", [])
    tags = dict(t.strip().split("=", 1) for t in "".join(str(signature).split()).split(";") if t)
    assert (tags["d"], tags["s"], tags["a"]) == ("example.com", "mw2026", "rsa-sha256")
    stack.wait_queues_empty()

    # The Internet host verifies what it received, asking its resolver (the stack's DNS)
    # for the key: dkimpy's dkimverify, on the delivered file as it lies in the Maildir.
    path = received_on_the_internet_host(stack, token)
    verified = stack.exec("internet", "sh", "-c", f"dkimverify < {path}", check=False)
    assert verified.returncode == 0 and "signature ok" in verified.stdout, verified.stdout + verified.stderr
    # The same message with one character of its body changed does not verify.
    raw = stack.read_file("internet", path)
    assert raw.count(f"as agreed. {token}") == 1
    changed = raw.replace(f"as agreed. {token}", f"as agreed! {token}")
    tampered = stack.exec("internet", "dkimverify", input=changed, check=False)
    assert tampered.returncode == 1 and "body hash mismatch" in tampered.stderr, tampered.stderr


def test_mail_forging_a_dmarc_reject_domain_is_refused_for_an_honouring_domain_and_tagged_for_a_tagging_one(
    stack: MailStack, token: str
) -> None:
    for address, action in ((HONOURS, "honour"), (TAGS, "tag")):
        explained = json.loads(stack.mailwarden("explain", "--json", address).stdout)
        assert explained["settings"]["dmarc_action"]["value"] == action

    # One message to both: the envelope sender is the Internet host's own (SPF passes),
    # the From is the bank's, which neither SPF nor a signature aligns with.
    milter_log = stack.log_size("front", "milter")
    sent = stack.swaks("internet", "--server", MX, "--from", "mailer@outside.test",
                       "--to", f"{HONOURS},{TAGS}", "--header", "From: Bank <security@bank.test>",
                       "--header", f"Subject: verify your account {token}")
    assert sent.returncode == 0, sent.stdout
    queue_id = queued_as(sent.stdout)
    line = stack.wait_for_log("front", rf"^.*{queue_id}: accept .*$", name="milter",
                              after=milter_log).group(0)
    assert f"{HONOURS}=reject[DMARC policy of bank.test: reject]" in line
    assert f"{TAGS}=deliver[DMARC policy of bank.test: reject, not applied (dmarc_action=tag)" in line
    assert "spf=pass" in line and "dmarc=fail(reject)" in line

    [tagged] = stack.wait_for_messages(stack.maildir(TAGS), match=token)
    [results] = tagged.get_all("Authentication-Results", [])
    assert re.match(r"mx\d\.mailwarden\.test;", str(results))
    flat = " ".join(str(results).split())
    for clause in ("dkim=none", "spf=pass smtp.mailfrom=mailer@outside.test",
                   "dmarc=fail (p=reject) header.from=bank.test"):
        assert clause in flat, flat
    stack.wait_queues_empty()
    assert not [m for m in read_maildir(stack.maildir(HONOURS)) if token in message_text(m)]

    # Sent to the honouring subscriber alone, the refusal is the SMTP reply itself.
    alone = stack.swaks("internet", "--server", MX, "--from", "mailer@outside.test", "--to", HONOURS,
                        "--header", "From: Bank <security@bank.test>",
                        "--header", f"Subject: verify your account again {token}")
    assert alone.returncode == 26, alone.stdout  # refused after the final dot
    assert "550 5.7.1 Message refused: DMARC policy of bank.test: reject" in alone.stdout
    stack.wait_queues_empty()
