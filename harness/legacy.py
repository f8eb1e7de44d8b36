"""A legacy mailbox server of the kind a domain is migrated away from: Dovecot over Maildir
with its own passwd-file users and crypt(3) / ``{SSHA}`` hashes, no LDAP.

It stands for a qmail-era system (vpopmail-style ``user@domain`` logins, Maildir, crypt
hashes).  Its POP3 UIDLs follow ``pop3_uidl_format``: Dovecot's default ``%08Xu%08Xv``
(IMAP UID and UIDVALIDITY), or ``%f``, the Maildir file name, which is what qmail-pop3d
(and Courier) present: a migration must fetch those from the POP3 server.
A migration master user (``auth_master_user_separator`` and a ``master = yes`` passdb)
lets ``doveadm`` on the new mailbox host read every mailbox over IMAP (imapc) and POP3
(pop3c) without the subscribers' passwords.  Mail arrives over LMTP.

Dovecot runs in the foreground (``dovecot -F``), is stopped by its PID, and listens on
127.0.0.1 at ports chosen at run time (or those given, in a container).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from harness.dovecot import DOVECOT, MAIL_UID, DovecotError, missing_dovecot
from harness.ports import free_port
from harness.process import TestDaemon, read_log, tail

__all__ = ["LegacyMailServer", "password_hash"]

DOVEADM = shutil.which("doveadm", path="/usr/sbin:/usr/bin:/sbin:/bin")


def password_hash(scheme: str, password: str) -> str:
    """``{SCHEME}hash`` made by ``doveadm pw`` (MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, SSHA,
    CRYPT), so the hashes are the ones Dovecot itself writes and checks."""
    if DOVEADM is None:
        raise DovecotError("doveadm not installed")
    res = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password], capture_output=True,
                         text=True, check=False, timeout=30)
    if res.returncode != 0:
        raise DovecotError(f"doveadm pw -s {scheme}: {res.stderr.strip()}")
    return res.stdout.strip()


class LegacyMailServer(TestDaemon):
    """Dovecot with passwd-file users: ``users`` maps ``user@domain`` to a hash
    (``{SCHEME}...``, or a bare crypt string)."""

    name = "legacy dovecot"

    def __init__(self, users: Mapping[str, str], *, master_user: str = "migrate",
                 master_password: str = "migrate-secret",  # noqa: S107 - a test server
                 workdir: Path | None = None,
                 listen: str = "127.0.0.1", pop3_port: int = 0, imap_port: int = 0,
                 lmtp_port: int = 0, pop3_uidl_format: str = "%08Xu%08Xv") -> None:
        reason = missing_dovecot()
        if reason is not None:
            raise DovecotError(reason)
        self.owns_dir = workdir is None
        self.dir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="mw-legacy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.users = dict(users)
        self.master_user = master_user
        self.master_password = master_password
        self.listen = listen
        self.pop3_port = pop3_port or free_port()
        self.imap_port = imap_port or free_port()
        self.lmtp_port = lmtp_port or free_port()
        self.pop3_uidl_format = pop3_uidl_format
        self.conf_path = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        self.mail_dir = self.dir / "mail"

    def conf_text(self) -> str:
        """The whole dovecot.conf."""
        d = self.dir
        return f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = mw-legacy-{self.imap_port}
protocols = pop3 imap lmtp
listen = {self.listen}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0
auth_master_user_separator = *
log_path = {self.log_path}
mail_location = maildir:~/Maildir
mail_uid = {MAIL_UID}
mail_gid = {MAIL_UID}
first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_UID}
postmaster_address = postmaster@legacy.invalid
pop3_uidl_format = {self.pop3_uidl_format}
namespace inbox {{
  inbox = yes
}}
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=SHA512-CRYPT {d}/master-users
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = scheme=CRYPT username_format=%Lu {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {d}/users
  default_fields = uid={MAIL_UID} gid={MAIL_UID} home={self.mail_dir}/%Lu
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {self.lmtp_port}
  }}
}}
"""

    def write_config(self) -> None:
        """Write dovecot.conf, the users and the master user."""
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        os.chown(self.mail_dir, MAIL_UID, MAIL_UID)
        self.conf_path.write_text(self.conf_text(), encoding="utf-8")
        lines = [f"{user.lower()}:{hashed}::::::" for user, hashed in self.users.items()]
        (self.dir / "users").write_text("\n".join(lines) + "\n", encoding="utf-8")
        master = password_hash("SHA512-CRYPT", self.master_password)
        (self.dir / "master-users").write_text(f"{self.master_user}:{master}\n", encoding="utf-8")

    def start(self) -> Self:
        """Write the configuration and start Dovecot; wait for every listener."""
        if self.pid is not None:
            return self
        self.write_config()
        assert DOVECOT is not None
        host = "127.0.0.1" if self.listen in ("*", "0.0.0.0") else self.listen  # noqa: S104
        ports = (self.pop3_port, self.imap_port, self.lmtp_port)
        self.launch([DOVECOT, "-F", "-c", str(self.conf_path)], self.dir / "console.log",
                    lambda: all(_listening(host, p) for p in ports), timeout=15.0, error=DovecotError)
        return self

    def log_text(self) -> str:
        """Dovecot's log."""
        return read_log(self.log_path)

    def log_tail(self, lines: int = 30) -> str:
        """The last log lines, for error messages."""
        console = self.dir / "console.log"
        text = self.log_text() + (console.read_text(errors="replace") if console.exists() else "")
        return tail(text, lines)

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``doveadm -c CONF ARGS``."""
        assert DOVEADM is not None
        return subprocess.run([DOVEADM, "-c", str(self.conf_path), *args], capture_output=True,
                              text=True, check=False, timeout=60)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_users(path: Path) -> dict[str, str]:
    """A passwd-file's ``user:hash:...`` lines (comments and blank lines skipped)."""
    users: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            user, hashed = line.split(":", 2)[:2]
            users[user] = hashed
    return users


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.legacy write-config``: the container stack's legacy host writes its
    dovecot.conf with this (``mw-init legacy``) and then runs ``dovecot -F`` itself."""
    parser = argparse.ArgumentParser(prog="python -m harness.legacy")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-config")
    write.add_argument("--users", type=Path, required=True)
    write.add_argument("--master-password-file", type=Path, required=True)
    write.add_argument("--workdir", type=Path, required=True)
    write.add_argument("--listen", default="*")
    write.add_argument("--pop3-port", type=int, default=110)
    write.add_argument("--imap-port", type=int, default=143)
    write.add_argument("--lmtp-port", type=int, default=24)
    write.add_argument("--pop3-uidl-format", default="%08Xu%08Xv",
                       help="%%08Xu%%08Xv (Dovecot's default) or %%f (qmail-pop3d's Maildir file name)")
    args = parser.parse_args(argv)
    server = LegacyMailServer(
        read_users(args.users), master_password=args.master_password_file.read_text().strip(),
        workdir=args.workdir, listen=args.listen, pop3_port=args.pop3_port, imap_port=args.imap_port,
        lmtp_port=args.lmtp_port, pop3_uidl_format=args.pop3_uidl_format,
    )
    server.write_config()
    print(server.conf_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
