"""A private, real Dovecot for end-to-end tests: POP3, IMAP, LMTP and SASL for Postfix.

Subscribers log in with their address (primary or alternate) and their LDAP
password, checked by binding to the test slapd as the subscriber (``auth_bind``): an
ISP's directory keeps hashed passwords that Dovecot should never read, and binding
also honours slapd's own password policy.  The search that finds the subscriber's DN
requires an active account (``mwAccountStatus`` missing or ``active``), so a
disabled subscriber cannot log in.  Mailboxes are Maildirs in the work directory,
owned by one virtual uid; the userdb is LDAP too, so LMTP refuses unknown recipients.

Dovecot runs in the foreground as a child process (``dovecot -F -c CONF``) and is
stopped by its PID.  Every listener is on 127.0.0.1 at a port chosen at run time.
"""

from __future__ import annotations

import atexit
import contextlib
import email
import email.policy
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Self

from harness.ports import free_port
from harness.process import TestDaemon, log_size, read_log, tail

__all__ = ["DovecotError", "DovecotServer", "login_report_settings", "missing_dovecot"]

_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")
DOVECOT = shutil.which("dovecot", path=_SBIN)
DOVECONF = shutil.which("doveconf", path=_SBIN)
LDAP_DRIVER = Path("/usr/lib/dovecot/modules/auth/libauthdb_ldap.so")
MAIL_UID = 5000  # a virtual mail owner with no passwd entry, as on a mailbox host

ACTIVE_SUBSCRIBER = (
    "(&(objectClass=mwSubscriber)(|(mail=%u)(mwAlternateAddress=%u))"
    "(|(!(mwAccountStatus=*))(mwAccountStatus=active)))"
)


_running: set[DovecotServer] = set()


class DovecotError(RuntimeError):
    """Dovecot could not be configured or started; the message holds the log tail."""


def missing_dovecot() -> str | None:
    """Why this machine cannot run the harness (a reason for pytest.skip), or None."""
    if DOVECOT is None or DOVECONF is None:
        return "dovecot not installed (apt-get install dovecot-core dovecot-pop3d dovecot-imapd " \
               "dovecot-lmtpd dovecot-ldap)"
    if not LDAP_DRIVER.exists():
        return f"{LDAP_DRIVER} missing (apt-get install dovecot-ldap)"
    for proto in ("pop3", "imap", "lmtp"):
        if not Path(f"/usr/lib/dovecot/{proto}").exists():
            return f"dovecot {proto} not installed (apt-get install dovecot-{proto}d)"
    if os.geteuid() != 0:
        return "a private Dovecot must be started as root"
    return None


def login_report_settings(url: str) -> dict[str, str]:
    """Dovecot's auth-policy settings that report every login to mailwarden's policy
    daemon (docs/policyd.md, "Dovecot wiring"), never asking it for a decision."""
    return {
        "auth_policy_server_url": url,
        "auth_policy_request_attributes":
            "login=%{requested_username} user=%{user} remote=%{rip} protocol=%s",
        "auth_policy_check_before_auth": "no",
        "auth_policy_check_after_auth": "no",
        "auth_policy_report_after_auth": "yes",
        "auth_policy_reject_on_fail": "no",
        "auth_policy_server_timeout_msecs": "2000",
        "auth_policy_hash_nonce": "mailwarden-test",
    }


class DovecotServer(TestDaemon):
    """Dovecot authenticating against an LDAP server (the test slapd).

    ``ldap_uri``/``ldap_base`` locate the subscribers; ``settings`` adds or overrides
    top-level dovecot.conf settings (``{"auth_policy_server_url": ...}``) and
    ``extra_conf`` is appended verbatim (sections such as ``plugin { }``);
    ``login_report_url`` reports every login to the policy daemon's endpoint.
    """

    def __init__(
        self,
        ldap_uri: str,
        *,
        ldap_base: str = "ou=domains,dc=mailwarden,dc=test",
        workdir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        extra_conf: str = "",
        pass_filter: str = ACTIVE_SUBSCRIBER,
        login_report_url: str | None = None,
        ldap_bind_dn: str = "cn=mailwarden,ou=services,dc=mailwarden,dc=test",
        ldap_bind_password: str = "secret",  # noqa: S107 - the sample tree's, for tests
    ) -> None:
        reason = missing_dovecot()
        if reason is not None:
            raise DovecotError(reason)
        self.owns_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mw-dovecot-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Login processes (dovenull) and mail processes (MAIL_UID) traverse this directory.
        self.dir.chmod(0o755)
        self.conf_path = self.dir / "dovecot.conf"
        self.ldap_conf_path = self.dir / "dovecot-ldap.conf.ext"
        self.log_path = self.dir / "dovecot.log"
        self.mail_dir = self.dir / "mail"
        self.ldap_uri = ldap_uri
        self.ldap_base = ldap_base
        # The search for the subscriber's DN binds as the daemons' account: the shipped
        # access rules show anonymous clients nothing.
        self.ldap_bind_dn = ldap_bind_dn
        self.ldap_bind_password = ldap_bind_password
        self.pass_filter = pass_filter
        self.pop3_port = free_port()
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.auth_port = free_port()
        self.settings = login_report_settings(login_report_url) if login_report_url else {}
        self.settings.update(settings or {})
        self.extra_conf = extra_conf

    # -- what other components point at ------------------------------------------------
    @property
    def sasl_path(self) -> str:
        """The value for Postfix ``smtpd_sasl_path`` (with ``smtpd_sasl_type = dovecot``)."""
        return f"inet:127.0.0.1:{self.auth_port}"

    @property
    def lmtp_nexthop(self) -> str:
        """A Postfix transport delivering to this Dovecot over LMTP."""
        return f"lmtp:inet:127.0.0.1:{self.lmtp_port}"

    def postfix_sasl_settings(self) -> dict[str, str]:
        """smtpd settings that turn on SMTP AUTH through this Dovecot."""
        return {
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": self.sasl_path,
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_tls_auth_only": "no",
        }

    # -- configuration -----------------------------------------------------------------
    def conf_text(self) -> str:
        """The complete dovecot.conf."""
        top = {
            "base_dir": str(self.dir / "run"),
            "state_dir": str(self.dir / "state"),
            "instance_name": f"mw-dovecot-{self.pop3_port}",
            "protocols": "pop3 imap lmtp",
            "listen": "127.0.0.1",
            "ssl": "no",
            "disable_plaintext_auth": "no",
            "auth_mechanisms": "plain login",
            "auth_verbose": "yes",
            # Tests log in wrongly on purpose: answer at once instead of after 2-15 s.
            "auth_failure_delay": "0",
            "log_path": str(self.log_path),
            "mail_home": f"{self.mail_dir}/%u",
            "mail_location": "maildir:~/Maildir",
            "mail_uid": str(MAIL_UID),
            "mail_gid": str(MAIL_UID),
            "first_valid_uid": str(MAIL_UID),
            "first_valid_gid": str(MAIL_UID),
            "postmaster_address": "postmaster@mailwarden.test",
            "pop3_uidl_format": "%08Xu%08Xv",
            "lmtp_save_to_detail_mailbox": "no",
            # One address is one mailbox: the userdb's "user" field is the primary address.
            "auth_username_format": "%Lu",
            **self.settings,
        }
        lines = [f"{k} = {v}" for k, v in top.items()]
        lines.append(f"""
passdb {{
  driver = ldap
  args = {self.ldap_conf_path}
}}
userdb {{
  driver = ldap
  args = {self.ldap_conf_path}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  inet_listener auth-client {{
    address = 127.0.0.1
    port = {self.auth_port}
  }}
}}
""")
        lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def ldap_conf_text(self) -> str:
        """dovecot-ldap.conf.ext: search as the daemons' account, bind as the subscriber; home
        and uid are fixed templates."""
        bind = f"dn = {self.ldap_bind_dn}\ndnpass = {self.ldap_bind_password}\n" if self.ldap_bind_dn else ""
        return f"""uris = {self.ldap_uri}
{bind}ldap_version = 3
base = {self.ldap_base}
scope = subtree
deref = never
auth_bind = yes
pass_filter = {self.pass_filter}
pass_attrs = mail=user
user_filter = {self.pass_filter}
user_attrs = mail=user, =home={self.mail_dir}/%{{ldap:mail}}
iterate_filter = (objectClass=mwSubscriber)
iterate_attrs = mail=user
"""

    def write_config(self) -> None:
        """Write both files and check them with ``doveconf -n``."""
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_dir, MAIL_UID, MAIL_UID)
        self.conf_path.write_text(self.conf_text(), encoding="utf-8")
        self.ldap_conf_path.write_text(self.ldap_conf_text(), encoding="utf-8")
        self.ldap_conf_path.chmod(0o600)
        self.doveconf_n()

    def doveconf_n(self) -> str:
        """``doveconf -c CONF -n`` (raises DovecotError with its complaint)."""
        assert DOVECONF is not None
        res = subprocess.run([DOVECONF, "-c", str(self.conf_path), "-n"], capture_output=True,
                             text=True, check=False, timeout=30)
        if res.returncode != 0:
            raise DovecotError(f"doveconf -c {self.conf_path} -n failed:\n{res.stderr.strip()}")
        return res.stdout

    # -- life cycle --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the Dovecot master is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> Self:
        """Write the configuration, start Dovecot and wait until every listener answers."""
        if self.running:
            return self
        self.write_config()
        assert DOVECOT is not None
        console = (self.dir / "console.log").open("ab")
        try:
            self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT)
        finally:
            console.close()
        deadline = time.monotonic() + timeout
        for port in (self.pop3_port, self.imap_port, self.lmtp_port, self.auth_port):
            while not self._listening(port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_tail()
                    self.stop()
                    raise DovecotError(f"dovecot did not listen on 127.0.0.1:{port}:\n{tail}")
                time.sleep(0.02)
        _running.add(self)
        return self

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop Dovecot by its PID (TERM, then KILL after 10 s)."""
        _running.discard(self)
        super().stop()

    def __repr__(self) -> str:
        return (f"DovecotServer({self.dir}, pop3 {self.pop3_port}, imap {self.imap_port}, "
                f"lmtp {self.lmtp_port}, auth {self.auth_port})")

    # -- logs and mailboxes ------------------------------------------------------------
    def log_offset(self) -> int:
        """The current end of the log (pass as ``since``)."""
        return log_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since``."""
        return read_log(self.log_path, since)

    def log_tail(self, lines: int = 30) -> str:
        """The last log lines (and the console's), for error messages."""
        console = self.dir / "console.log"
        text = self.log_text()
        if console.exists():
            text += console.read_text(errors="replace")
        return tail(text, lines)

    def maildir(self, address: str, folder: str = "INBOX") -> Path:
        """The Maildir folder of a subscriber's primary address (``Junk`` → ``.Junk``)."""
        root = self.mail_dir / address.lower() / "Maildir"
        return root if folder == "INBOX" else root / f".{folder}"

    def messages(self, address: str, folder: str = "INBOX") -> list[EmailMessage]:
        """Messages stored in a folder (new and cur), oldest first."""
        base = self.maildir(address, folder)
        files = [p for sub in ("new", "cur") if (base / sub).is_dir() for p in (base / sub).iterdir()]
        out: list[EmailMessage] = []
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers a crashed test run left behind (our own children only)."""
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()
