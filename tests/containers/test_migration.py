"""Migrating oldisp.test from its legacy system (the ``legacy`` host) while mail flows.

The legacy host is what a qmail-era ISP runs: Maildir, a passwd file with crypt and
``{SSHA}`` hashes, POP3 UIDLs that are Maildir file names (as qmail-pop3d's), and its own
MX.  The subscribers are taken over into LDAP with those
hashes (``mwLegacyPassword``), the domain starts ``legacy``, and then:
mail lands on the legacy host (filtered on the way), POP3 through the front node's proxy
reaches it with the legacy password, ``mailwarden migrate sync`` copies the mailboxes
on mbox1, a sender keeps sending during ``cutover`` and loses nothing, the same POP3
client sees the same UIDLs afterwards, and ``rollback`` brings mail back.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import threading
import time
from collections.abc import Iterator

import pytest

from harness.containers import MailStack, read_maildir
from tests.containers.conftest import CACHE_WAIT
from tests.containers.test_inbound import virus_message

MX = "mx.mailwarden.test"  # the balancer: the front nodes take only its PROXY connections
DOMAIN = "oldisp.test"
BASE = "ou=domains,dc=mailwarden,dc=test"
DOMAIN_DN = f"mwDomainName={DOMAIN},{BASE}"
ADMIN = ("cn=admin,dc=mailwarden,dc=test", "secret")
USERS = ("ann", "ben", "cat", "dan")  # MD5-CRYPT, SHA512-CRYPT, DES crypt, SSHA on the legacy host
MESSAGES = 25  # per mailbox before the first sync
MASTER_PW = "/root/legacy-master.pw"


def _address(name: str) -> str:
    return f"{name}@{DOMAIN}"


def _password(name: str) -> str:
    return f"{name}-legacy"


def _ldap(stack: MailStack, tool: str, text: str) -> None:
    stack.exec("ldap", tool, "-x", "-H", "ldap://localhost/", "-D", ADMIN[0], "-w", ADMIN[1], input=text)


@pytest.fixture(scope="module")
def legacy(stack: MailStack) -> Iterator[MailStack]:
    """oldisp.test in LDAP as it is taken over: state legacy, its legacy hosts, and its
    subscribers with the hashes of the legacy passwd file."""
    hashes = {}
    for line in stack.read_file("legacy", "/etc/mailwarden-stack/legacy/users").splitlines():
        if line and not line.startswith("#"):
            user, hashed = line.split(":")[:2]
            hashes[user] = hashed
    entries = [f"""dn: {DOMAIN_DN}
objectClass: mwDomain
mwDomainName: {DOMAIN}
mwMigrationState: legacy
mwLegacyMx: [{stack.ip('legacy')}]:25
mwLegacyMailboxHost: {stack.ip('legacy')}
mwEnabledService: virus-scan
"""]
    for name in USERS:
        entries.append(f"""dn: uid={name},{DOMAIN_DN}
objectClass: inetOrgPerson
objectClass: mwSubscriber
uid: {name}
cn: {name}
sn: {name}
mail: {_address(name)}
mwLegacyPassword: {hashes[_address(name)]}
""")
    _ldap(stack, "ldapadd", "\n".join(entries))
    stack.exec("mbox1", "sh", "-c", f"umask 077 && cat > {MASTER_PW}", input="migrate-secret\n")
    time.sleep(CACHE_WAIT)
    try:
        yield stack
    finally:
        dns = [f"uid={n},{DOMAIN_DN}" for n in USERS] + [DOMAIN_DN]
        stack.exec("ldap", "ldapdelete", "-x", "-H", "ldap://localhost/", "-D", ADMIN[0], "-w", ADMIN[1],
                   *dns, check=False)


def _legacy_pop3(stack: MailStack, name: str) -> poplib.POP3:
    """POP3 straight to the legacy server (what the subscriber's client used before)."""
    pop = poplib.POP3(stack.ip("legacy"), 110, timeout=30)
    pop.user(_address(name))
    pop.pass_(_password(name))
    return pop


def _uidls(pop: poplib.POP3) -> list[str]:
    try:
        return [line.decode().split()[1] for line in pop.uidl()[1]]
    finally:
        pop.quit()


def _lmtp_legacy(stack: MailStack, name: str, subjects: list[str]) -> None:
    with smtplib.LMTP(stack.ip("legacy"), 24, timeout=30) as lmtp:
        for subject in subjects:
            lmtp.sendmail("old@outside.test", [_address(name)],
                          f"From: old@outside.test\r\nTo: {_address(name)}\r\nSubject: {subject}\r\n"
                          f"Message-ID: <{subject.replace(' ', '.')}@outside.test>\r\n\r\n{subject}\r\n")


def _migrate(stack: MailStack, *args: str, timeout: float = 900.0) -> str:
    done = stack.mailwarden("migrate", *args, "--master-password-file", MASTER_PW, host="mbox1",
                            admin=True, check=False, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _total(output: str) -> tuple[int, int]:
    """(messages at the source, messages copied) from a summary table's total row."""
    match = re.search(r"total\s+│\s+(\d+)\s+│\s+│\s+│\s+(\d+)\s", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


class Sender(threading.Thread):
    """Sends mail from the Internet host to ann and ben through the MX until stopped."""

    def __init__(self, stack: MailStack, token: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.token = stack, token
        self.stop = threading.Event()
        self.accepted: list[str] = []
        self.refused: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 200:
            subject = f"flow {self.token} {i}"
            to = _address(("ann", "ben")[i % 2])
            sent = self.stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", to,
                                    "--header", f"Subject: {subject}")
            (self.accepted if sent.returncode == 0 else self.refused).append(subject)
            i += 1


def test_a_domain_moves_from_its_legacy_system_while_mail_flows(legacy: MailStack, token: str) -> None:
    stack = legacy
    status = stack.mailwarden("migrate", "status", DOMAIN).stdout
    assert "migration_state      legacy" in status and "from domain" in status

    # legacy: inbound mail is filtered on the front node and lands on the legacy host.
    sent = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", _address("ann"),
                       "--header", f"Subject: first {token}")
    assert sent.returncode == 0, sent.stdout
    virus = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", _address("ann"),
                        "--data", "-", input_text=virus_message("alice@outside.test", _address("ann"),
                                                                f"bad {token}").as_string())
    assert virus.returncode == 26 and "5.7.1" in virus.stdout, virus.stdout
    stack.wait_for_log("legacy", rf"to=<ann@{re.escape(DOMAIN)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:24.*"
                       r"status=sent")
    assert not read_maildir(stack.maildir(_address("ann")))  # nothing on the new mailbox hosts

    # POP3 through the front node's proxy with each legacy password (every hash scheme).
    for name in USERS:
        _lmtp_legacy(stack, name, [f"old {name} {token} {i}" for i in range(MESSAGES)])
        pop = stack.pop3(_address(name), _password(name))
        count = pop.stat()[0]
        pop.quit()
        # ann also has the first message and the virus notice for the refused one.
        assert count == MESSAGES + (2 if name == "ann" else 0), name
    with pytest.raises(poplib.error_proto, match="Authentication failed"):
        stack.pop3(_address("ann"), "secret")
    before = {n: _uidls(stack.pop3(_address(n), _password(n))) for n in USERS}
    assert before["ann"] == _uidls(_legacy_pop3(stack, "ann"))
    assert all(re.fullmatch(r"\d+\.M\d+P\d+\.[^:]+", u) for u in before["ann"]), before["ann"]

    # sync on mbox1, twice: the second run copies nothing.
    started = time.monotonic()
    first = _migrate(stack, "sync", DOMAIN)
    took = time.monotonic() - started
    total = len(USERS) * MESSAGES + 2
    assert _total(first) == (total, total)
    assert _total(_migrate(stack, "sync", DOMAIN))[1] == 0
    print(f"migrate sync: {len(USERS)} mailboxes, {total} messages, {took:.1f} s")
    assert "migration_state      syncing" in stack.mailwarden("migrate", "status", DOMAIN).stdout

    # cutover while a sender keeps sending: every accepted message arrives once.
    sender = Sender(stack, token)
    sender.start()
    try:
        time.sleep(3)
        started = time.monotonic()
        _migrate(stack, "cutover", DOMAIN)
        took = time.monotonic() - started
        time.sleep(3)
    finally:  # never leave it sending into the next tests
        sender.stop.set()
        sender.join(120)
    assert not sender.refused, sender.refused
    assert len(sender.accepted) >= 4
    print(f"migrate cutover: {took:.1f} s; {len(sender.accepted)} messages sent around it")
    stack.wait_queues_empty(60)
    assert not stack.queue("legacy")
    # Mail the legacy MX took in the last moments of the switch: one more catch-up.
    _migrate(stack, "catch-up", DOMAIN)
    arrived = [m["Subject"] for n in ("ann", "ben") for m in read_maildir(stack.maildir(_address(n)))]
    for subject in sender.accepted:
        assert arrived.count(subject) == 1, (subject, sorted(arrived))

    # The same POP3 client, now served by mbox1: the same UIDLs for the same messages.
    time.sleep(CACHE_WAIT)
    for name in USERS:
        after = _uidls(stack.pop3(_address(name), _password(name)))
        assert after[:len(before[name])] == before[name], name
        assert len(set(after)) == len(after)
    assert "Login: user=<ann@oldisp.test>" in stack.log("mbox1", "dovecot")

    # rollback: mail delivered to mbox1 since the cut-over goes back to the legacy host.
    late = stack.swaks("internet", "--server", MX, "--from", "alice@outside.test", "--to", _address("dan"),
                       "--header", f"Subject: late {token}")
    assert late.returncode == 0, late.stdout
    stack.wait_for_messages(stack.maildir(_address("dan")), match=f"late {token}")
    _migrate(stack, "rollback", DOMAIN, "--settle", str(CACHE_WAIT))
    assert "migration_state      legacy" in stack.mailwarden("migrate", "status", DOMAIN).stdout
    pop = stack.pop3(_address("dan"), _password("dan"))  # through the proxy: the legacy host again
    subjects = [b"".join(pop.top(i, 0)[1]).decode(errors="replace") for i in range(1, pop.stat()[0] + 1)]
    pop.quit()
    assert sum(f"late {token}" in s for s in subjects) == 1
