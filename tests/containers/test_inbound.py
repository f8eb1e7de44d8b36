"""Mail from the Internet host to subscribers, through the front node, into the mailbox hosts."""

from __future__ import annotations

import json
import re
from email.message import EmailMessage

from harness.containers import MailStack, message_text, read_maildir
from mailwarden.catalogue import JUNK_HEADER
from milters.filters.spam import SPAM_HEADERS
from tests.containers.conftest import DirectoryChanges

MX = "mx.mailwarden.test"  # the balancer
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# Assembled here so that no virus scanner flags this file.
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
HOST_NAMES = {"mbox1": "mbox1.example.jp", "mbox2": "mbox2.example.jp"}


def lmtp_delivered(recipient: str, host: str, stack: MailStack) -> str:
    """The front node's log line for an LMTP delivery of ``recipient`` to mailbox ``host``."""
    ip = re.escape(stack.ip(host))
    return (rf"postfix-mailbox/lmtp\[\d+\]: \w+: to=<{re.escape(recipient)}>, "
            rf"relay={re.escape(HOST_NAMES[host])}\[{ip}\]:24, .*status=sent")


def queued_as(swaks_output: str) -> str:
    """The queue id the front node gave in its 250 reply to swaks."""
    found = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", swaks_output)
    assert found, swaks_output
    return found.group(1)


def virus_message(sender: str, recipient: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, recipient, subject
    msg.set_content("The report is attached.\n")
    msg.add_attachment(EICAR.encode(), maintype="application", subtype="octet-stream",
                       filename="report.txt")
    return msg


def test_clean_mail_lands_in_inbox_and_is_read_over_pop3_and_imap_through_the_proxy(
    stack: MailStack, token: str
) -> None:
    front_log, proxy_log = stack.log_size("front"), stack.log_size("front", "dovecot")
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "taro@example.jp", "--header", f"Subject: hello {token}")
    assert sent.returncode == 0, sent.stdout
    queue_id = queued_as(sent.stdout)

    [message] = stack.wait_for_messages(stack.maildir("taro@example.jp"), match=token)
    assert message["Subject"] == f"hello {token}"
    assert any("by mbox1.example.jp with LMTP" in r for r in message.get_all("Received", []))
    assert "Received-SPF: Pass" in message_text(message)  # the policy daemon asked the stub DNS
    stack.wait_for_log("front", rf"postfix-mx/smtpd/smtpd\[\d+\]: {queue_id}: "
                       rf"client=mx\.outside\.test\[{re.escape(stack.ip('internet'))}\]", after=front_log)
    stack.wait_for_log("front", lmtp_delivered("taro@example.jp", "mbox1", stack), after=front_log)
    stack.wait_for_log("front", rf"{queue_id}: accept mwid=\w+ from=<alice@outside\.test> .*"
                       r"taro@example\.jp=deliver .*virus=clean", name="milter")
    stack.wait_queues_empty()

    pop = stack.pop3("taro@example.jp")
    try:
        subjects = [b"\n".join(pop.top(n, 0)[1]) for n in range(1, pop.stat()[0] + 1)]
        assert any(f"Subject: hello {token}".encode() in s for s in subjects)
    finally:
        pop.quit()
    imap = stack.imap("taro@example.jp")
    try:
        imap.select("INBOX", readonly=True)
        status, found = imap.search(None, "SUBJECT", f'"{token}"')
        assert status == "OK" and len(found[0].split()) == 1
        status, data = imap.fetch(found[0].split()[0], "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert token.encode() in data[0][1]
    finally:
        imap.logout()
    backend = re.escape(stack.ip("mbox1"))
    for port in (110, 143):
        stack.wait_for_log("front", rf"proxy\(taro@example\.jp,{backend}:{port}\): Started proxying",
                           name="dovecot", after=proxy_log)


def test_gtube_lands_in_junk_for_a_contracted_subscriber_and_untouched_for_another(
    stack: MailStack, token: str
) -> None:
    # The stack's SpamAssassin scores GTUBE 10 (deploy/container/.../local.cf): above
    # taro's threshold (5), below his reject score (15).  bob has no spam check.
    for recipient in ("taro@example.jp", "bob@example.com"):
        sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", recipient,
                           "--header", f"Subject: offer {token}", "--body", f"{GTUBE}\n{token}\n")
        assert sent.returncode == 0, sent.stdout

    [junk] = stack.wait_for_messages(stack.maildir("taro@example.jp", "Junk"), match=token)
    assert junk[JUNK_HEADER]
    assert not [m for m in read_maildir(stack.maildir("taro@example.jp")) if token in message_text(m)]

    [clean] = stack.wait_for_messages(stack.maildir("bob@example.com"), match=token)
    assert clean["Subject"] == f"offer {token}"
    assert JUNK_HEADER not in clean and not any(h in clean for h in SPAM_HEADERS)
    assert GTUBE in message_text(clean)
    assert not [m for m in read_maildir(stack.maildir("bob@example.com", "Junk")) if token in message_text(m)]
    # Spam for taro, and below his reject score: delivered, marked for Junk.
    stack.wait_for_log("front", r"taro@example\.jp=deliver .*spam=(?:[5-9]|1[0-4])\.\d\(spam\)",
                       name="milter")
    stack.wait_queues_empty()


def test_eicar_is_refused_and_a_japanese_notice_reaches_the_recipient_and_the_domain_admin(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    # example.jp: notices in Japanese to the recipient and the domain's administrator.
    admin = f"admin-{token}@outside.test"
    directory.set("domain", "example.jp", "admin_address", admin)
    front_log = stack.log_size("front")
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", "taro@example.jp",
                       "--data", "-", input_text=virus_message("alice@outside.test", "taro@example.jp",
                                                               f"invoice {token}").as_string())
    assert sent.returncode == 26, sent.stdout  # refused after the final dot
    assert re.search(r"<\*\* 550 5\.7\.1 .*virus Mailwarden\.Test\.EICAR", sent.stdout), sent.stdout
    stack.wait_for_log("front", r"milter-reject: END-OF-MESSAGE from mx\.outside\.test.*5\.7\.1",
                       after=front_log)

    [notice] = stack.wait_for_messages(stack.maildir("taro@example.jp"), match=token)
    assert notice["Subject"] == "ウイルスを検出しました（taro@example.jp 宛てのメール）"
    assert "あなた宛てのメールからウイルスが検出された" in message_text(notice)
    assert EICAR not in message_text(notice)
    [to_admin] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=admin)
    assert "ウイルス名:  Mailwarden.Test.EICAR" in message_text(to_admin)
    stack.wait_queues_empty()


def test_virus_notice_of_a_hosted_company_is_in_english_and_reaches_the_sender(
    stack: MailStack, token: str
) -> None:
    # example.com: notices in English to the recipient and the sender.
    sender = f"sender-{token}@outside.test"
    sent = stack.swaks("internet", "--server", MX, "--from", sender, "--to", "bob@example.com",
                       "--data", "-", input_text=virus_message(sender, "bob@example.com",
                                                               f"invoice {token}").as_string())
    assert sent.returncode == 26, sent.stdout
    [to_sender] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=sender)
    assert "virus" in str(to_sender["Subject"]).lower()
    assert "ウイルス" not in message_text(to_sender)
    [to_recipient] = stack.wait_for_messages(stack.maildir("bob@example.com"), match=token)
    assert "virus" in str(to_recipient["Subject"]).lower()
    stack.wait_queues_empty()


def test_mail_for_a_subscriber_on_mailbox_host_b_is_routed_to_b(stack: MailStack, token: str) -> None:
    # prof@lab.example.org has mwMailHost mbox2.example.jp; the domain names no host.
    front_log, mbox2_log = stack.log_size("front"), stack.log_size("mbox2", "dovecot")
    mbox1_log, proxy_log = stack.log_size("mbox1", "dovecot"), stack.log_size("front", "dovecot")
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "prof@lab.example.org", "--header", f"Subject: seminar {token}")
    assert sent.returncode == 0, sent.stdout

    [message] = stack.wait_for_messages(stack.maildir("prof@lab.example.org"), match=token)
    assert any("by mbox2.example.jp with LMTP" in r for r in message.get_all("Received", []))
    stack.wait_for_log("front", lmtp_delivered("prof@lab.example.org", "mbox2", stack), after=front_log)
    stack.wait_for_log("mbox2", r"lmtp\(prof@lab\.example\.org\).*stored mail into mailbox 'INBOX'",
                       name="dovecot", after=mbox2_log)
    assert "prof@lab.example.org" not in stack.log("mbox1", "dovecot")[mbox1_log:]
    stack.wait_queues_empty()

    stack.pop3("prof@lab.example.org").quit()  # the proxy finds the same host in LDAP
    stack.wait_for_log("front", rf"proxy\(prof@lab\.example\.org,{re.escape(stack.ip('mbox2'))}:110\): "
                       "Started proxying", name="dovecot", after=proxy_log)


def test_an_unknown_user_at_a_domain_alias_is_refused_at_rcpt(stack: MailStack) -> None:
    """No backscatter: the MX refuses the address at RCPT, as at the canonical domain."""
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "nosuchuser@example.ne.jp")
    assert sent.returncode != 0, sent.stdout
    assert re.search(r"<\*\* 550 5\.1\.1 <nosuchuser@example\.ne\.jp>: Recipient address rejected",
                     sent.stdout), sent.stdout
    assert "queued as" not in sent.stdout


def test_a_role_address_at_a_domain_alias_reaches_the_domain_admin(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    """abuse@ has no entry: the MX accepts it and the route stage sends it to the
    domain's admin_address, where ``mailwarden explain`` says it goes."""
    admin = f"admin-{token}@outside.test"
    directory.set("domain", "example.jp", "admin_address", admin)
    explained = json.loads(stack.mailwarden("explain", "--json", "abuse@example.ne.jp").stdout)
    assert explained["kind"] == "role" and explained["canonical"] == admin
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test",
                       "--to", "abuse@example.ne.jp", "--header", f"Subject: complaint {token}")
    assert sent.returncode == 0, sent.stdout
    [message] = stack.wait_for_messages(stack.internet_maildir(), match=token, delivered_to=admin)
    assert message["Subject"] == f"complaint {token}"
    stack.wait_queues_empty()


def test_postmaster_and_abuse_of_a_hosted_domain_reach_its_admins_mailbox(
    stack: MailStack, token: str
) -> None:
    """The sample domain example.com names alice as its admin: its role addresses, in any
    case, are delivered to her mailbox without an entry of their own."""
    roles = ("postmaster@example.com", "ABUSE@example.com")
    for rcpt in roles:
        sent = stack.swaks("internet", "--server", MX, "--from", "reporter@outside.test", "--to", rcpt,
                           "--header", f"Subject: report to {rcpt} {token}")
        assert sent.returncode == 0, sent.stdout
    delivered = stack.wait_for_messages(stack.maildir("alice@example.com"), 2, match=token)
    assert sorted(str(m["Subject"]) for m in delivered) == sorted(f"report to {r} {token}" for r in roles)
    stack.wait_queues_empty()
