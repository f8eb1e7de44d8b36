"""Rendered Dovecot roles: doveconf's reading of them, and the real Dovecot running them
against the test slapd (userdb vs the effective policy, LMTP + Sieve, quota-status,
the POP3/IMAP proxy, a directory outage)."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

import ldap
from harness.slapd import SlapdServer
from harness.smtpsink import SmtpSink
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import AddressKind, PolicyResolver
from mailwarden.render import FORWARD_DOMAIN
from milters.signing import Sealer, SigningKey, generate_key, public_record
from tests.conftest import ADMIN_DN
from tests.render.conftest import (
    RenderedDovecot,
    RenderedPostfix,
    Site,
    compat_ldap_toml,
    ldap_toml,
    need_dovecot,
    need_postfix,
    pop3_login,
    site_root,
)

SAMPLE_USERS = [
    "taro@example.jp", "taro.yamada@example.ne.jp", "hanako@example.jp", "jiro@example.jp",
    "pbs@example.jp", "alice@example.com", "sales@example.com", "bob@example.com", "carol@example.com",
    "prof@lab.example.org", "nobody@bare.example.net", "ghost@example.jp", "x@not-hosted.example",
]
COMPAT_USERS = ["ken@legacy.example", "k.tanaka@old-legacy.example", "mika@legacy.example",
                "yui@legacy.example", "ghost@legacy.example"]


def doveconf(conf: Path) -> str:
    import subprocess

    res = subprocess.run(["doveconf", "-c", str(conf), "-n"], capture_output=True, text=True, check=False,
                         timeout=30)
    assert res.returncode == 0 and not res.stderr, res.stderr
    return res.stdout


def test_doveconf_reads_both_roles(site: Site) -> None:
    need_dovecot()
    site.dovecot()
    etc = site.root / "etc"
    mailbox = doveconf(etc / "dovecot-mailbox" / "dovecot.conf")
    r = site.config.render
    # NFS: no mmap, fsync always, storage caches flushed, indexes on local disk.
    for line in ("mmap_disable = yes", "mail_fsync = always", "mail_nfs_storage = yes",
                 f"mail_location = maildir:~/Maildir:INDEX={r.index_root}/%d/%n",
                 f"args = {etc}/dovecot-mailbox/mailwarden-passdb-user.conf.ext",
                 f"args = {etc}/dovecot-mailbox/mailwarden-userdb-user.conf.ext",
                 f"args = allow_all_users=yes home={r.mail_root}/%d/%n",
                 "executable = quota-status -p postfix", f"port = {r.quota_status_port}",
                 f"port = {r.mailbox_port}", "quota = maildir:User quota",
                 f"sieve_before = {etc}/dovecot-mailbox/sieve/mailwarden.sieve",
                 "sieve_global_extensions = +vnd.dovecot.environment",
                 f"auth_policy_server_url = http://127.0.0.1:{site.ports['login_report']}/",
                 "mail_plugins = \" quota sieve\"", "lmtp_rcpt_check_quota = yes"):
        assert line in mailbox, line
    assert "mail_nfs_index" not in mailbox  # "no" is Dovecot's default: indexes are local
    proxy_site = site.as_proxy()
    proxy_site.dovecot("proxy")
    proxy = doveconf(etc / "dovecot-proxy" / "dovecot.conf")
    for line in ("protocols = imap pop3", "driver = prefetch", "args = noauthenticate proxy=y host=127.0.0.1",
                 f"port = {site.ports['sasl']}",
                 f"auth_policy_server_url = http://127.0.0.1:{site.ports['login_report']}/"):
        assert line in proxy, line
    assert "lmtp" not in proxy and "mail_location" not in proxy


def resolver(site: Site) -> PolicyResolver:
    config = site.config
    return PolicyResolver(LdapDirectory(config.ldap), config)


def _expected(found: PolicyResolver, address: str) -> dict[str, str] | None:
    policy = found.effective_policy(address)
    if policy.kind is not AddressKind.SUBSCRIBER:
        return None
    quota = policy.get("quota")
    local, domain = (policy.canonical or address).split("@")
    expected = {
        "home": f"/{domain}/{local}",
        "quota_rule": f"*:bytes={quota}",
    }
    forwards = policy.get("forward_addresses")
    if forwards:
        expected["sieve_env_mailwarden_forward"] = forwards[0]
    return expected


def _userdb_matches_policy(site: Site, dovecot: RenderedDovecot, users: list[str]) -> None:
    found = resolver(site)
    for address in users:
        expected = _expected(found, address)
        fields = dovecot.userdb(address)
        if expected is None:
            assert fields is None, address
            continue
        assert fields is not None, address
        assert fields["home"].endswith(expected.pop("home")), (address, fields)
        # The site default (0 = unlimited) is a plugin setting, not a userdb field.
        fields.setdefault("quota_rule", "*:bytes=0")
        for key, value in expected.items():
            assert fields.get(key) == value, (address, key, fields)


def test_userdb_agrees_with_the_effective_policy(
    mailbox_host: tuple[Site, RenderedDovecot, SmtpSink],
) -> None:
    """For every sample subscriber, Dovecot's userdb (LDAP steps merged by the rendered
    chain) gives the same quota, forward and home as mailwarden."""
    site, dovecot, _ = mailbox_host
    _userdb_matches_policy(site, dovecot, SAMPLE_USERS)


def test_userdb_agrees_with_the_effective_policy_under_the_alternative_mapping(
    slapd: SlapdServer, running: list,
) -> None:
    need_dovecot()
    with site_root() as root:
        site = Site(root, compat_ldap_toml(slapd))
        site.dovecot("mailbox")
        dovecot = RenderedDovecot(site, "mailbox")
        dovecot.start(site.ports["lmtp"])
        running.append(dovecot)
        _userdb_matches_policy(site, dovecot, COMPAT_USERS)


def _message(sender: str, to: str, subject: str, junk: bool = False) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@outside.test>"
    if junk:
        msg["X-Mailwarden-Junk"] = "yes"
    msg.set_content("hello\n")
    return msg.as_bytes()


def _lmtp(port: int, sender: str, recipients: list[str], data: bytes) -> dict[str, int]:
    """Deliver to each recipient in its own LMTP transaction (smtplib reads only one
    reply after DATA); return the final reply code per recipient."""
    codes: dict[str, int] = {}
    for rcpt in recipients:
        with smtplib.LMTP("127.0.0.1", port) as lmtp:
            try:
                lmtp.sendmail(sender, [rcpt], data)
                codes[rcpt] = 250
            except smtplib.SMTPRecipientsRefused as exc:
                codes[rcpt] = exc.recipients[rcpt][0]
    return codes


def _maildir(site: Site, user: str, folder: str = "") -> list[Path]:
    local, domain = user.split("@")
    base = site.root / "mail" / domain / local / "Maildir"
    path = base / f".{folder}" if folder else base
    return sorted((path / "new").glob("*")) if (path / "new").exists() else []


@pytest.fixture(scope="module")
def mailbox_host(slapd: SlapdServer) -> Iterator[tuple[Site, RenderedDovecot, SmtpSink]]:
    """The rendered mailbox role running (shared by the module's tests, which touch
    different mailboxes), with a sink where Sieve forwards and replies go."""
    need_dovecot()
    with site_root() as root:
        site = Site(root, ldap_toml(slapd))
        with SmtpSink(port=site.ports["relay"]) as relay:
            site.dovecot("mailbox")
            dovecot = RenderedDovecot(site, "mailbox")
            dovecot.start(site.ports["lmtp"], site.ports["quota"], site.ports["pop3"])
            try:
                yield site, dovecot, relay
            finally:
                dovecot.stop()


def test_mail_marked_junk_goes_to_junk_for_every_subscriber(
    mailbox_host: tuple[Site, RenderedDovecot, SmtpSink],
) -> None:
    """The milter marks mail for Junk for spam_check subscribers (spam_action junk) and
    for anyone with a keyword rule whose action is junk, and strips the header from
    outside mail: the mark alone decides, whatever the subscriber's services."""
    site, _, _ = mailbox_host
    recipients = ["taro.yamada@example.ne.jp", "bob@example.com", "prof@lab.example.org", "ghost@example.jp"]
    codes = _lmtp(site.ports["lmtp"], "spammer@outside.test", recipients,
                  _message("spammer@outside.test", "you@example.jp", "cheap pills", junk=True))
    assert codes == {"taro.yamada@example.ne.jp": 250, "bob@example.com": 250, "prof@lab.example.org": 250,
                     "ghost@example.jp": 550}
    # taro contracted spam checking (alias domain and alternate address resolved by LDAP);
    # bob switched spam_check off and prof's domain never had it: a keyword rule's junk.
    for user in ("taro@example.jp", "bob@example.com", "prof@lab.example.org"):
        assert len(_maildir(site, user, "Junk")) == 1 and not _maildir(site, user), user
    # Without the mark, mail stays in the INBOX.
    assert _lmtp(site.ports["lmtp"], "friend@outside.test", ["bob@example.com"],
                 _message("friend@outside.test", "bob@example.com", "lunch")) == {"bob@example.com": 250}
    assert len(_maildir(site, "bob@example.com")) == 1 and len(_maildir(site, "bob@example.com", "Junk")) == 1


def test_forwarding_and_vacation_from_ldap(mailbox_host: tuple[Site, RenderedDovecot, SmtpSink]) -> None:
    site, _, relay = mailbox_host
    port = site.ports["lmtp"]
    assert _lmtp(port, "friend@outside.test", ["hanako@example.jp"],
                 _message("friend@outside.test", "hanako@example.jp", "lunch")) == {"hanako@example.jp": 250}
    # One copy to her forwarding address, which the route stage expands (see below); the
    # subscriber is the envelope sender (SPF at the target).
    forwarded = relay.wait_for(1)[0]
    assert forwarded.recipients == (f"hanako=example.jp@{FORWARD_DOMAIN}",)
    assert forwarded.envelope_sender == "hanako@example.jp"
    assert len(_maildir(site, "hanako@example.jp")) == 1  # forward_keep_copy TRUE
    relay.clear()
    # alice is on vacation: one answer per sender and period, also for mail to her alias.
    for i in range(2):
        assert _lmtp(port, "friend@outside.test", ["sales@example.com"],
                     _message("friend@outside.test", "sales@example.com", f"question {i}")) == {
            "sales@example.com": 250}
    replies = relay.wait_for(1)
    assert len(replies) == 1 and replies[0].recipients == ("friend@outside.test",)
    assert replies[0].header("Subject") == "Away until Monday"
    assert len(_maildir(site, "alice@example.com")) == 2
    # Spam is not forwarded.
    relay.clear()
    _lmtp(port, "spammer@outside.test", ["hanako@example.jp"],
          _message("spammer@outside.test", "hanako@example.jp", "spam", junk=True))
    assert len(_maildir(site, "hanako@example.jp", "Junk")) == 1 and relay.messages == []


def _sealed_by_example_jp(data: bytes) -> tuple[bytes, Callable[[bytes], bytes | None]]:
    """``data`` with our Authentication-Results and an ARC set by example.jp (as the milter
    seals mail a subscriber forwards, Date absent as Postfix may add it on the way), and
    a check of a copy's chain against its key."""
    private, algorithm = generate_key("rsa")
    record = public_record(private, algorithm).encode()
    data = b"Authentication-Results: mx.isp.test; spf=pass smtp.mailfrom=a@outside.test; arc=none\n" + data
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    sealer = Sealer("example.jp", SigningKey("mw1", algorithm, private), "mx.isp.test")
    head = b"".join(f"{n}: {v}\r\n".replace("\n", "\r\n").replace("\r\r", "\r").encode()
                    for n, v in sealer.header_fields(data))

    def verify_arc(copy: bytes) -> bytes | None:
        found: bytes | None = dkim.ARC(copy).verify(
            dnsfunc=lambda name, timeout=5: record if name == b"mw1._domainkey.example.jp." else b"")[0]
        return found

    return head + data, verify_arc


HANAKO_DN = "uid=hanako,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test"


def test_every_forward_address_gets_the_message(slapd_rw: SlapdServer) -> None:
    """hanako forwards to a hosted address and, now, to one outside too: Dovecot reads only
    the first value, so Sieve sends one copy to her forwarding address and the rendered
    route stage (the real Postfix, its LDAP table) turns it into both."""
    need_dovecot()
    need_postfix()
    conn = ldap.initialize(slapd_rw.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    conn.modify_s(HANAKO_DN, [(ldap.MOD_ADD, "mwForwardAddress", [b"hanako.far@elsewhere.example"])])
    conn.unbind_s()
    with site_root() as root:
        site = Site(root, ldap_toml(slapd_rw))
        ports = site.ports
        # Sieve's forwards go straight to the route stage (in production: through a front node's MX).
        site.text = site.text.replace(f'sieve_relay = "127.0.0.1:{ports["relay"]}"',
                                      f'sieve_relay = "127.0.0.1:{ports["route"]}"')
        with SmtpSink(port=ports["mailbox"]) as hosted, SmtpSink(port=ports["outbound"]) as internet:
            site.postfix("route")
            route = RenderedPostfix(site, "route")
            route.set(smtp_dns_support_level="disabled", smtpd_peername_lookup="no")
            site.dovecot("mailbox")
            dovecot = RenderedDovecot(site, "mailbox")
            # Both stop before the site's directory goes (Postfix is stopped through it).
            try:
                route.start()
                dovecot.start(ports["lmtp"])
                message = _message("friend@outside.test", "hanako@example.jp", "dinner")
                sealed, verify_arc = _sealed_by_example_jp(message)
                assert _lmtp(ports["lmtp"], "friend@outside.test", ["hanako@example.jp"], sealed) == {
                    "hanako@example.jp": 250}
                copies = ((hosted, "hanako@example.com"), (internet, "hanako.far@elsewhere.example"))
                for sink, address in copies:
                    try:
                        copy = sink.wait_for(1, timeout=30)[0]
                    except TimeoutError:
                        raise AssertionError(route.log()[-3000:] + dovecot.log()[-2000:]) from None
                    assert copy.recipients == (address,)
                    assert copy.envelope_sender == "hanako@example.jp"
                    assert copy.header("Subject") == "dinner"
                    # The ARC set the milter added where the message arrived survives
                    # Dovecot's delivery, the Sieve redirect and the route stage.
                    assert verify_arc(copy.data) == dkim.CV_Pass
                assert verify_arc(copy.data.replace(b"hello", b"HELLO")) == dkim.CV_Fail
                assert len(_maildir(site, "hanako@example.jp")) == 1  # forward_keep_copy TRUE
                # A forwarding address nobody has is refused at the route stage, never relayed.
                with smtplib.SMTP("127.0.0.1", ports["route"], timeout=30) as smtp:
                    code, _ = smtp.docmd("MAIL FROM:<a@outside.test>")
                    assert code == 250
                    code, text = smtp.docmd(f"RCPT TO:<nobody=example.jp@{FORWARD_DOMAIN}>")
                    assert code == 550, text
            finally:
                dovecot.stop()
                route.stop()


def _quota_status(port: int, recipient: str, size: int) -> str:
    request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient={recipient}\n"
               f"size={size}\nsender=a@outside.test\n\n")
    with socket.create_connection(("127.0.0.1", port), 10) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).decode().strip()


def test_quota_status_refuses_what_would_not_fit(
    mailbox_host: tuple[Site, RenderedDovecot, SmtpSink],
) -> None:
    site, _, _ = mailbox_host
    port = site.ports["quota"]
    # taro's quota is 1 GiB (mwQuota), bob has none (0 = unlimited).
    assert _quota_status(port, "taro@example.jp", 2 * 1024**3) == "action=552 5.2.2 Mailbox is full"
    assert _quota_status(port, "taro@example.jp", 10_000) == "action=DUNNO"
    assert _quota_status(port, "bob@example.com", 2 * 1024**3) == "action=DUNNO"
    assert _quota_status(port, "ghost@example.jp", 10_000) == "action=DUNNO"


def test_proxy_sends_each_subscriber_to_their_mailbox_host(
    mailbox_host: tuple[Site, RenderedDovecot, SmtpSink], running: list,
) -> None:
    site, backend, _ = mailbox_host
    front = site.as_proxy()
    front.dovecot("proxy")
    proxy = RenderedDovecot(front, "proxy")
    proxy.start(site.ports["proxy_pop3"], site.ports["sasl"])
    running.append(proxy)
    # nobody's domain names no mailbox host: default_mailbox_host (127.0.0.1) serves.
    assert pop3_login(site.ports["proxy_pop3"], "nobody@bare.example.net").startswith(b"+OK")
    assert "Started proxying to <127.0.0.1>" in proxy.log()
    assert "Login: user=<nobody@bare.example.net>" in backend.log()
    # A disabled account cannot log in (the password is right).
    with pytest.raises(Exception, match="Authentication failed"):
        pop3_login(site.ports["proxy_pop3"], "jiro@example.jp")
    # Everyone else is routed by LDAP: the proxy names their host (not contacted here: no DNS).
    test = proxy.doveadm("auth", "test", "-x", "service=imap", "taro.yamada@example.ne.jp", "secret")
    assert test.returncode == 0, test.stdout + test.stderr
    assert "user=taro@example.jp" in test.stdout and "host=mbox1.example.jp" in test.stdout
    assert f"port={site.ports['imap']}" in test.stdout
    hanako = proxy.doveadm("auth", "test", "-x", "service=pop3", "hanako@example.jp", "secret")
    assert "host=mbox2.example.jp" in hanako.stdout and f"port={site.ports['pop3']}" in hanako.stdout


def test_directory_outage_tempfails_delivery_and_login(slapd_rw: SlapdServer, running: list) -> None:
    need_dovecot()
    with site_root() as root:
        site = Site(root, ldap_toml(slapd_rw))
        site.dovecot("mailbox")
        dovecot = RenderedDovecot(site, "mailbox")
        dovecot.start(site.ports["lmtp"], site.ports["pop3"])
        running.append(dovecot)
        slapd_rw.stop()
        # Never "550 no such user" or a silent delivery without the subscriber's settings.
        assert _lmtp(site.ports["lmtp"], "a@outside.test", ["bob@example.com"],
                     _message("a@outside.test", "bob@example.com", "hi")) == {"bob@example.com": 451}
        with pytest.raises(Exception, match=r"TEMP|UNAVAILABLE|Temporary"):
            pop3_login(site.ports["pop3"], "bob@example.com")
