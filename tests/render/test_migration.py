"""Migrating a domain from a legacy mailbox server, with the real daemons on loopback:

* the rendered Postfix mailbox stage relays a legacy domain's mail to its legacy MX and,
  once the state says migrated, to the mailbox host, without a reload;
* the rendered Dovecot proxy sends a legacy domain's POP3 logins to the legacy server,
  the legacy hashes (MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, SSHA, DES crypt) accepted;
* ``mailwarden migrate sync`` copies with dsync over imapc, incrementally, keeping UIDs,
  flags and so the POP3 UIDLs; cutover, catch-up and rollback move the rest.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import re
import smtplib
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import ldap
from harness.legacy import LegacyMailServer, password_hash
from harness.slapd import SERVICE_BIND, SlapdServer
from harness.smtpsink import SmtpSink
from tests.conftest import ADMIN_DN
from tests.render.conftest import (
    MAILWARDEN,
    RenderedDovecot,
    RenderedPostfix,
    Site,
    need_dovecot,
    need_postfix,
    site_root,
)

DOMAIN = "old.example.net"
DOMAIN_DN = f"mwDomainName={DOMAIN},ou=domains,dc=mailwarden,dc=test"
SCHEMES = {"ann": "MD5-CRYPT", "ben": "SSHA", "cat": "SHA512-CRYPT", "dan": "SHA256-CRYPT", "eve": "CRYPT"}


@dataclass
class Legacy:
    """The site, the legacy server and the directory connection of one test."""

    site: Site
    server: LegacyMailServer
    conn: ldap.ldapobject.LDAPObject
    hashes: dict[str, str]

    def set_domain(self, **values: str | None) -> None:
        mods = [(ldap.MOD_REPLACE, attr, [v.encode()] if v else None) for attr, v in values.items()]
        self.conn.modify_s(DOMAIN_DN, mods)

    def deliver_legacy(self, user: str, subject: str) -> None:
        with smtplib.LMTP("127.0.0.1", self.server.lmtp_port) as lmtp:
            lmtp.sendmail("sender@outside.test", [user], _message(user, subject))

    def cli_config(self) -> str:
        """The site's configuration, bound as the admin (the CLI writes migration_state)."""
        path = self.site.root / "cli.toml"
        path.write_text(self.site.text.replace(
            SERVICE_BIND, f'bind_dn = "{ADMIN_DN}"\nbind_password = "secret"\n', 1))
        return str(path)

    def migrate(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        password = self.site.root / "master.pw"
        password.write_text(self.server.master_password + "\n")
        password.chmod(0o600)
        command, domain = args[0], args[1]
        extra = ["--master-password-file", str(password), "--master-user", self.server.master_user,
                 "--state-dir", str(self.site.root / "migrate-state")]
        if command == "status":
            extra = []
        if command in ("cutover", "rollback"):
            extra += ["--settle", "0"]
        res = subprocess.run([MAILWARDEN, "-c", self.cli_config(), "migrate", command, domain,
                              *extra, *args[2:]],
                             capture_output=True, text=True, check=False, timeout=300)
        if check:
            assert res.returncode == 0, res.stdout + res.stderr
        return res


def _message(to: str, subject: str) -> str:
    return (f"From: sender@outside.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@outside.test>\r\n\r\n{subject}\r\n")


def _ldap_toml(server: SlapdServer) -> str:
    # A short cache_ttl lets the Dovecot proxy's auth cache follow a state change within
    # the test.  The daemons read as their account; the CLI binds as the admin (cli_config).
    return (f'[ldap]\nuri = "{server.uri}"\n{SERVICE_BIND}retry_max = 1\nretry_delay = 0.2\n'
            '[policy]\ncache_ttl = 1\nnegative_cache_ttl = 1\ndomain_cache_ttl = 1\n')


@pytest.fixture
def legacy(slapd_rw: SlapdServer) -> Iterator[Legacy]:
    """A legacy domain in LDAP (its subscribers' legacy hashes taken over), and the legacy
    server with the same users and hashes in its own passwd-file."""
    with _legacy(slapd_rw) as it:
        yield it


@pytest.fixture
def legacy_qmail(slapd_rw: SlapdServer) -> Iterator[Legacy]:
    """The same, the legacy POP3 server presenting qmail-pop3d's UIDLs (the Maildir file name)."""
    with _legacy(slapd_rw, pop3_uidl_format="%f") as it:
        yield it


@contextlib.contextmanager
def _legacy(slapd_rw: SlapdServer, pop3_uidl_format: str = "%08Xu%08Xv") -> Iterator[Legacy]:
    need_dovecot()
    hashes = {f"{name}@{DOMAIN}": password_hash(scheme, f"{name}-pw")
              for name, scheme in SCHEMES.items() if scheme != "CRYPT"}
    # A traditional DES crypt(3) hash without a {SCHEME} prefix, as a qmail-era passwd
    # file keeps it (doveadm pw makes bcrypt for CRYPT, so the standard library makes it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        hashes[f"eve@{DOMAIN}"] = crypt.crypt("eve-pw", "Qm")
    conn = ldap.initialize(slapd_rw.uri)
    conn.simple_bind_s(ADMIN_DN, "secret")
    conn.add_s(DOMAIN_DN, [("objectClass", [b"mwDomain"]), ("mwDomainName", [DOMAIN.encode()]),
                           ("mwMigrationState", [b"legacy"]), ("mwLegacyMailboxHost", [b"127.0.0.1"]),
                           ("mwMailHost", [b"127.0.0.1"]), ("mwEnabledService", [b"virus-scan"])])
    for address, hashed in hashes.items():
        local = address.split("@")[0]
        conn.add_s(f"uid={local},{DOMAIN_DN}", [
            ("objectClass", [b"inetOrgPerson", b"mwSubscriber"]), ("uid", [local.encode()]),
            ("cn", [local.encode()]), ("sn", [local.encode()]), ("mail", [address.encode()]),
            ("mwLegacyPassword", [hashed.encode()]),
        ])
    server = LegacyMailServer(hashes, pop3_uidl_format=pop3_uidl_format).start()
    with site_root() as root:
        site = Site(root, _ldap_toml(slapd_rw),
                    f"legacy_pop3_port = {server.pop3_port}\nlegacy_imap_port = {server.imap_port}\n")
        try:
            yield Legacy(site, server, conn, hashes)
        finally:
            server.cleanup()
            conn.unbind_s()


def _transport(mailbox: RenderedPostfix, address: str) -> str | None:
    """What the mailbox stage's transport_maps answer for ``address``: each table asked for
    the address, then for its domain, as trivial-rewrite asks them."""
    specs = mailbox.settings()["transport_maps"].replace("proxy:", "").split(", ")
    for key in (address, address.split("@")[1]):
        for spec in specs:
            answer = mailbox.query(spec, key)
            if answer is not None:
                return answer
    return None


def test_mailbox_stage_follows_the_state_without_a_reload(legacy: Legacy, running: list) -> None:
    need_postfix()
    site = legacy.site
    site.dovecot("mailbox")
    newhost = RenderedDovecot(site, "mailbox")
    newhost.start(site.ports["lmtp"])
    running.append(newhost)
    with SmtpSink() as legacy_mx:
        legacy.set_domain(mwLegacyMx=legacy_mx.relayhost)
        site.postfix("mailbox", "mx")
        # The edge takes a legacy domain's mail as a hosted domain's (the milter and the
        # policy daemon apply its services); only the mailbox stage routes it elsewhere.
        edge = RenderedPostfix(site, "mx")
        assert edge.lookup("ldap-domains", DOMAIN) == DOMAIN
        assert edge.lookup("ldap-recipients", f"ann@{DOMAIN}") == f"ann@{DOMAIN}"
        stage = RenderedPostfix(site, "mailbox")
        assert "to-legacy/unix" in stage.services()
        assert _transport(stage, f"ann@{DOMAIN}") == f"to-legacy:{legacy_mx.relayhost}"
        assert _transport(stage, "hanako@example.jp") == f"lmtp:inet:mbox2.example.jp:{site.ports['lmtp']}"
        stage.start()
        running.append(stage)
        with smtplib.SMTP("127.0.0.1", site.ports["mailbox"]) as smtp:
            smtp.sendmail("sender@outside.test", [f"ann@{DOMAIN}"], _message(f"ann@{DOMAIN}", "while legacy"))
        try:
            arrived = legacy_mx.wait_for(1)
        except TimeoutError:
            pytest.fail(stage.log()[-3000:])
        assert arrived[0].message["Subject"] == "while legacy"

        # syncing still goes to the legacy MX; migrated goes to the mailbox host at once.
        legacy.set_domain(mwMigrationState="syncing")
        assert _transport(stage, f"ann@{DOMAIN}") == f"to-legacy:{legacy_mx.relayhost}"
        legacy.set_domain(mwMigrationState="migrated")
        assert _transport(stage, f"ann@{DOMAIN}") == f"lmtp:inet:127.0.0.1:{site.ports['lmtp']}"
        # (Another address: a Postfix process keeps its last resolved address for a few
        # seconds, well within the directory caches' TTL.)
        with smtplib.SMTP("127.0.0.1", site.ports["mailbox"]) as smtp:
            smtp.sendmail("sender@outside.test", [f"ben@{DOMAIN}"], _message(f"ben@{DOMAIN}", "after"))
        inbox = site.root / "mail" / DOMAIN / "ben" / "Maildir" / "new"
        deadline = time.monotonic() + 20
        while not (inbox.exists() and any(inbox.iterdir())):
            assert time.monotonic() < deadline, stage.log()[-3000:]
            time.sleep(0.2)
        assert len(legacy_mx.messages) == 1

        # A legacy domain without a legacy MX is deferred, never put in a new mailbox.
        legacy.set_domain(mwMigrationState="legacy", mwLegacyMx=None)
        assert _transport(stage, f"ann@{DOMAIN}") == f"retry:4.3.5 legacy domain {DOMAIN} has no legacy_mx"


def _pop3(port: int, user: str, password: str) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def _uidls(port: int, user: str, password: str) -> list[str]:
    pop = _pop3(port, user, password)
    try:
        return [line.decode().split()[1] for line in pop.uidl()[1]]
    finally:
        pop.quit()


def test_proxy_sends_legacy_logins_to_the_legacy_server_with_legacy_hashes(
    legacy: Legacy, running: list,
) -> None:
    site = legacy.site
    site.dovecot("mailbox")
    newhost = RenderedDovecot(site, "mailbox")
    newhost.start(site.ports["pop3"])
    running.append(newhost)
    front = site.as_proxy()
    front.dovecot("proxy")
    proxy = RenderedDovecot(front, "proxy")
    proxy.start(site.ports["proxy_pop3"], site.ports["proxy_imap"])
    running.append(proxy)
    port = site.ports["proxy_pop3"]
    for name, scheme in SCHEMES.items():
        user = f"{name}@{DOMAIN}"
        legacy.deliver_legacy(user, f"hello {name}")
        try:
            pop = _pop3(port, user, f"{name}-pw")
        except poplib.error_proto:
            pytest.fail(proxy.log()[-4000:])
        assert pop.stat()[0] == 1, scheme
        pop.quit()
        assert f"Login: user=<{user}>" in legacy.server.log_text(), scheme
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            _pop3(port, user, f"{name}-wrong")
    assert "Started proxying to <127.0.0.1>" in proxy.log()
    assert "user=<ann@old.example.net>" not in newhost.log()
    # IMAP goes to the legacy server's IMAP port.
    with imaplib.IMAP4("127.0.0.1", site.ports["proxy_imap"], timeout=10) as imap:
        imap.login(f"cat@{DOMAIN}", "cat-pw")
        assert imap.select("INBOX") == ("OK", [b"1"])
    assert re.search(r"imap-login: Info: Login: user=<cat@old\.example\.net>", legacy.server.log_text())

    # migrated: the mailbox host serves the domain, and checks the same legacy hash.
    legacy.set_domain(mwMigrationState="migrated")
    time.sleep(2.5)  # the proxy's auth cache (cache_ttl = 1 s here)
    pop = _pop3(port, f"ben@{DOMAIN}", "ben-pw")
    assert pop.stat()[0] == 0  # nothing copied yet: the new, empty mailbox
    pop.quit()
    assert "Login: user=<ben@old.example.net>" in newhost.log()


def test_sync_cutover_catch_up_and_rollback_keep_uids_uidls_and_flags(legacy: Legacy, running: list) -> None:
    site = legacy.site
    site.dovecot("mailbox")
    newhost = RenderedDovecot(site, "mailbox")
    newhost.start(site.ports["pop3"], site.ports["lmtp"])
    running.append(newhost)
    users = [f"{n}@{DOMAIN}" for n in ("ann", "ben")]
    for user in users:
        for i in range(5):
            legacy.deliver_legacy(user, f"old {i}")
    res = legacy.server.doveadm("flags", "add", "-u", users[0], "\\Seen \\Flagged", "mailbox", "INBOX",
                                "uid", "2")
    assert res.returncode == 0, res.stderr
    before = {u: _uidls(legacy.server.pop3_port, u, u.split("@")[0] + "-pw") for u in users}

    status = legacy.migrate("status", DOMAIN)
    assert "migration_state      legacy" in status.stdout and "from domain" in status.stdout
    first = legacy.migrate("sync", DOMAIN, "--user", users[0], "--user", users[1])
    assert "migration_state syncing" in first.stderr
    assert re.search(r"total\s+│\s+10\s+│\s+│\s+│\s+10\s", first.stdout), first.stdout
    # A second run copies nothing; new mail and a flag change are all the third copies.
    again = legacy.migrate("sync", DOMAIN, "--user", users[0], "--user", users[1])
    assert re.search(r"total\s+│\s+10\s+│\s+│\s+│\s+0\s", again.stdout), again.stdout
    legacy.deliver_legacy(users[1], "old 5")
    legacy.server.doveadm("flags", "add", "-u", users[1], "\\Answered", "mailbox", "INBOX", "uid", "1")
    third = legacy.migrate("sync", DOMAIN, "--user", users[0], "--user", users[1])
    assert re.search(r"total\s+│\s+11\s+│\s+│\s+│\s+1\s", third.stdout), third.stdout
    flags = newhost.doveadm("fetch", "-u", users[1], "uid flags", "mailbox", "INBOX", "uid", "1").stdout
    assert "\\Answered" in flags

    # Cut-over: the state switches; mail the legacy server still takes afterwards is caught up.
    legacy.migrate("cutover", DOMAIN, "--user", users[0], "--user", users[1])
    assert "mwMigrationState: migrated" in _domain_ldif(legacy)
    after = {u: _uidls(site.ports["pop3"], u, u.split("@")[0] + "-pw") for u in users}
    assert after[users[0]] == before[users[0]]
    assert after[users[1]][:5] == before[users[1]]  # and old 5 after them
    fetched = newhost.doveadm("fetch", "-u", users[0], "uid flags", "mailbox", "INBOX", "uid", "2").stdout
    assert "\\Seen" in fetched and "\\Flagged" in fetched
    legacy.deliver_legacy(users[0], "late on legacy")
    legacy.migrate("catch-up", DOMAIN, "--user", users[0])
    assert len(_uidls(site.ports["pop3"], users[0], "ann-pw")) == 6
    # Late legacy mail whose UID collides with new mail here: copied once, however often
    # catch-up runs (the dsync state).
    with smtplib.LMTP("127.0.0.1", site.ports["lmtp"]) as lmtp:
        lmtp.sendmail("sender@outside.test", [users[0]], _message(users[0], "new here"))
    legacy.deliver_legacy(users[0], "later on legacy")
    legacy.migrate("catch-up", DOMAIN, "--user", users[0])
    legacy.migrate("catch-up", DOMAIN, "--user", users[0])
    subjects = newhost.doveadm("fetch", "-u", users[0], "hdr.subject", "mailbox", "INBOX").stdout
    assert subjects.count("later on legacy") == 1 and subjects.count("new here") == 1, subjects
    assert subjects.count("late on legacy") == 1, subjects

    # Rollback: mail the mailbox host received goes back to the legacy server, once.
    with smtplib.LMTP("127.0.0.1", site.ports["lmtp"]) as lmtp:
        lmtp.sendmail("sender@outside.test", [users[1]], _message(users[1], "new host only"))
    back = legacy.migrate("rollback", DOMAIN, "--user", users[0], "--user", users[1])
    assert "migration_state legacy" in back.stderr
    subjects = legacy.server.doveadm("fetch", "-u", users[1], "hdr.subject", "mailbox", "INBOX").stdout
    assert subjects.count("new host only") == 1, subjects
    ann = legacy.server.doveadm("fetch", "-u", users[0], "hdr.subject", "mailbox", "INBOX").stdout
    assert ann.count("new here") == 1 and ann.count("later on legacy") == 1, ann
    # A second rollback copies nothing twice (messages are matched by Message-ID).
    legacy.set_domain(mwMigrationState="migrated")
    legacy.migrate("rollback", DOMAIN, "--user", users[0], "--user", users[1])
    again = legacy.server.doveadm("fetch", "-u", users[1], "hdr.subject", "mailbox", "INBOX").stdout
    assert again == subjects
    # Refused steps say why and change nothing.
    refused = legacy.migrate("cutover", DOMAIN, check=False)
    assert refused.returncode == 1 and "run mailwarden migrate sync first" in refused.stderr


def test_qmail_style_uidls_survive_the_cutover(legacy_qmail: Legacy, running: list) -> None:
    """A legacy POP3 server whose UIDLs are Maildir file names (qmail-pop3d, Courier): the
    default sync fetches them over POP3 and the mailbox host serves them after the switch;
    a sync that derives them from the IMAP UIDs (``--pop3-uidls derived``) would not."""
    legacy = legacy_qmail
    site = legacy.site
    site.dovecot("mailbox")
    newhost = RenderedDovecot(site, "mailbox")
    newhost.start(site.ports["pop3"], site.ports["lmtp"])
    running.append(newhost)
    ann, ben = f"ann@{DOMAIN}", f"ben@{DOMAIN}"
    for user in (ann, ben):
        for i in range(3):
            legacy.deliver_legacy(user, f"qmail {i}")
    before = {u: _uidls(legacy.server.pop3_port, u, u.split("@")[0] + "-pw") for u in (ann, ben)}
    files = {p.name.split(":")[0] for p in (legacy.server.mail_dir / ann / "Maildir").glob("*/*")}
    assert set(before[ann]) == files and len(files) == 3  # the Maildir file names, as qmail's
    legacy.migrate("sync", DOMAIN, "--user", ann)
    legacy.migrate("sync", DOMAIN, "--user", ben, "--pop3-uidls", "derived")
    legacy.deliver_legacy(ann, "qmail 3")  # a last message, copied by the cut-over
    before[ann] = _uidls(legacy.server.pop3_port, ann, "ann-pw")
    legacy.migrate("cutover", DOMAIN, "--user", ann)
    assert "mwMigrationState: migrated" in _domain_ldif(legacy)
    assert _uidls(site.ports["pop3"], ann, "ann-pw") == before[ann]
    derived = _uidls(site.ports["pop3"], ben, "ben-pw")
    assert len(derived) == 3 and not set(derived) & set(before[ben])
    # New mail on the mailbox host gets the host's own UIDL format next to the kept ones.
    with smtplib.LMTP("127.0.0.1", site.ports["lmtp"]) as lmtp:
        lmtp.sendmail("sender@outside.test", [ann], _message(ann, "new here"))
    after = _uidls(site.ports["pop3"], ann, "ann-pw")
    assert after[:4] == before[ann] and re.fullmatch(r"[0-9a-f]{16}", after[4])


def test_import_users_takes_the_legacy_passwd_file_over(legacy: Legacy, running: list) -> None:
    """The legacy server's own passwd file, crypt strings without prefixes as qmail-era
    files hold them: a dry run writes nothing, bad lines stop the import, and then every
    subscriber logs in to the mailbox host (which checks the imported hash) with the
    legacy password; the audit log names the change without the hash."""
    site = legacy.site
    for address in legacy.hashes:
        legacy.conn.modify_s(f"uid={address.split('@')[0]},{DOMAIN_DN}",
                             [(ldap.MOD_DELETE, "mwLegacyPassword", None)])
    lines = [f"{address.split('@')[0]}:{re.sub(r'^[{](MD5|SHA256|SHA512)-CRYPT[}]', '', hashed)}:::::"
             for address, hashed in legacy.hashes.items()]
    assert any(line.split(":")[1].startswith("$1$") for line in lines)
    good = site.root / "vpasswd"
    good.write_text("# legacy passwd\n" + "\n".join(lines) + "\n")
    bad = site.root / "vpasswd.bad"
    bad.write_text(good.read_text() + "gone:$1$abc$0123456789012345678901\nlocked:!\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MAILWARDEN, "-c", legacy.cli_config(), "migrate", "import-users", DOMAIN,
                               *args], capture_output=True, text=True, check=False, timeout=120)

    refused = run(str(bad))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "line 7: no subscriber gone@old.example.net" in refused.stderr
    assert "line 8: locked@old.example.net: '!' is a locked" in refused.stderr
    unknown = site.root / "vpasswd.unknown"
    unknown.write_text(good.read_text() + "gone:$1$abc$0123456789012345678901\n")
    skipped = run(str(unknown), "--dry-run", "--skip-unknown")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped: line 7: no subscriber gone@old.example.net" in skipped.stderr
    dry = run(str(good), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "line 2: ann@old.example.net: legacy_password: (unset) -> {MD5-CRYPT}" in dry.stdout
    assert "line 6: eve@old.example.net: legacy_password: (unset) -> {CRYPT}" in dry.stdout
    assert "dry run: 5 subscriber(s) would change" in dry.stdout and "$1$" not in dry.stdout
    assert "mwLegacyPassword" not in _user_ldif(legacy, "ann")
    done = run(str(good))
    assert done.returncode == 0, done.stderr
    assert "5 subscriber(s) changed, 0 unchanged, 0 refused" in done.stdout
    assert f"mwLegacyPassword: {{MD5-CRYPT}}{lines[0].split(':')[1]}" in _user_ldif(legacy, "ann")
    again = run(str(good))
    assert "0 subscriber(s) changed, 5 unchanged" in again.stdout, again.stdout + again.stderr
    audit = legacy.conn.search_s("dc=mailwarden,dc=test", ldap.SCOPE_SUBTREE,
                                 f"(&(objectClass=mwAuditRecord)(mwAuditTarget=uid=ann,{DOMAIN_DN}))")
    [(_dn, record)] = audit
    change = record["mwAuditChange"][0].decode()
    assert "{MD5-CRYPT}(hash withheld)" in change and "$1$" not in change

    legacy.set_domain(mwMigrationState="migrated")
    site.dovecot("mailbox")
    newhost = RenderedDovecot(site, "mailbox")
    newhost.start(site.ports["pop3"])
    running.append(newhost)
    for name, scheme in SCHEMES.items():
        try:
            _pop3(site.ports["pop3"], f"{name}@{DOMAIN}", f"{name}-pw").quit()
        except poplib.error_proto:
            pytest.fail(f"{scheme}: {newhost.log()[-3000:]}")
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            _pop3(site.ports["pop3"], f"{name}@{DOMAIN}", f"{name}-wrong")


def _user_ldif(legacy: Legacy, local: str) -> str:
    [(_dn, attrs)] = legacy.conn.search_s(f"uid={local},{DOMAIN_DN}", ldap.SCOPE_BASE)
    return "\n".join(f"{k}: {v.decode()}" for k, vs in attrs.items() for v in vs)


def _domain_ldif(legacy: Legacy) -> str:
    [(_dn, attrs)] = legacy.conn.search_s(DOMAIN_DN, ldap.SCOPE_BASE)
    return "\n".join(f"{k}: {v.decode()}" for k, vs in attrs.items() for v in vs)


def test_status_shows_where_mail_goes(legacy: Legacy) -> None:
    legacy.set_domain(mwLegacyMx="[192.0.2.25]:25")
    out = legacy.migrate("status", DOMAIN).stdout
    assert "legacy_mx            [192.0.2.25]:25" in out
    assert "relayed to the legacy MX [192.0.2.25]:25" in out and "subscribers          5" in out
    shown = subprocess.run([MAILWARDEN, "-c", legacy.cli_config(), "domain", "show", DOMAIN],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    assert re.search(r"migration_state\s+legacy\s+from domain", shown)
    assert re.search(r"legacy_mailbox_host\s+127.0.0.1\s+from domain", shown)
    explain = subprocess.run([MAILWARDEN, "-c", legacy.cli_config(), "explain", f"ann@{DOMAIN}"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    # A legacy domain is hosted here: its subscribers get the services (virus_scan from the domain).
    assert "subscriber" in explain and re.search(r"virus_scan\s+on\s+from domain", explain)
    assert re.search(r"migration_state\s+legacy\s+from domain", explain)
    # A legacy mailbox host with a port is refused where it is set and where it is given.
    refused = subprocess.run([MAILWARDEN, "-c", legacy.cli_config(), "domain", "set", DOMAIN,
                              "legacy_mailbox_host", "127.0.0.1:110"],
                             capture_output=True, text=True, check=False, timeout=60)
    assert refused.returncode != 0 and "ports come from render.legacy_pop3_port" in refused.stderr
    assert "mwLegacyMailboxHost: 127.0.0.1" in _domain_ldif(legacy)
    given = legacy.migrate("sync", DOMAIN, "--legacy-host", "127.0.0.1:143", check=False)
    assert given.returncode == 1
    assert "--legacy-host: legacy_mailbox_host: '127.0.0.1:143' has a port" in given.stderr
    assert "mwMigrationState: legacy" in _domain_ldif(legacy)



