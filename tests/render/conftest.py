"""Rendered Postfix and Dovecot configurations, checked and run with the real binaries.

Every rendered file points into a temporary directory (queues, sockets, mailboxes,
logs), every listener is on 127.0.0.1 at a free port, and every daemon is stopped
by its own PID or its own configuration directory.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dovecot import missing_dovecot
from harness.ports import free_port
from harness.postfix import missing_postfix, run_with_tty
from harness.slapd import SERVICE_BIND, SlapdServer
from mailwarden.config import Config, parse_config
from mailwarden.render import Rendered, render_dovecot, render_postfix
from tests.conftest import DATA

MAILWARDEN = str(Path(sys.executable).with_name("mailwarden"))
MAIL_UID = 5000  # the virtual owner of the mailboxes, as on a mailbox host


def need_postfix() -> None:
    """Skip unless the real Postfix can be run here."""
    reason = missing_postfix()
    if reason:
        pytest.skip(reason)


def need_dovecot() -> None:
    """Skip unless the real Dovecot can be run here."""
    reason = missing_dovecot() or (None if shutil.which("sievec") else "dovecot-sieve missing")
    if reason:
        pytest.skip(reason)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited ({proc.returncode}) before port {port} opened") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s") from None
            time.sleep(0.05)


class Site:
    """A mailwarden configuration whose [render] paths all point into one directory."""

    def __init__(self, root: Path, ldap_toml: str, extra: str = "") -> None:
        self.root = root
        self.ports = {name: free_port() for name in (
            "pop_before_smtp", "submission", "mx", "route", "mailbox", "outbound", "reinject",
            "imap", "pop3", "lmtp", "quota", "proxy_imap", "proxy_pop3", "sasl", "policyd",
            "login_report", "relay",
        )}
        p = self.ports
        self.text = f"""{ldap_toml}
[policyd]
listen = ["inet:127.0.0.1:{p['policyd']}"]
login_report_listen = ["inet:127.0.0.1:{p['login_report']}"]
[milter]
socket = "unix:{root}/milter/milter.sock"
reinject = "inet:127.0.0.1:{p['reinject']}"
spool_dir = "{root}/milter/spool"
quarantine_dir = "{root}/milter/quarantine"
[store]
sqlite_path = "{root}/state.sqlite3"
[render]
myhostname = "front1.mailwarden.test"
config_directory = "{root}/etc/{{instance}}"
queue_directory = "{root}/spool/{{instance}}"
data_directory = "{root}/lib/{{instance}}"
maillog_file = "{root}/maillog"
inet_protocols = "ipv4"
tls_cert_file = "{root}/tls/cert.pem"
tls_key_file = "{root}/tls/key.pem"
submission_listen = ["127.0.0.1:{p['submission']}"]
submissions_listen = []
pop_before_smtp_listen = ["127.0.0.1:{p['pop_before_smtp']}"]
mx_listen = ["127.0.0.1:{p['mx']}"]
route_listen = "127.0.0.1:{p['route']}"
mailbox_listen = "127.0.0.1:{p['mailbox']}"
outbound_listen = "127.0.0.1:{p['outbound']}"
quota_status_host = "127.0.0.1"
quota_status_port = {p['quota']}
mailbox_port = {p['lmtp']}
imap_port = {p['imap']}
pop3_port = {p['pop3']}
imaps_port = 0
pop3s_port = 0
dovecot_config_dir = "{root}/etc/dovecot-{{role}}"
dovecot_base_dir = "{root}/run/dovecot-{{role}}"
dovecot_state_dir = "{root}/state/dovecot-{{role}}"
dovecot_log_path = "{root}/dovecot-{{role}}.log"
dovecot_listen = "127.0.0.1"
dovecot_ssl = "no"
mail_root = "{root}/mail"
index_root = "{root}/index"
mail_uid = "{MAIL_UID}"
mail_gid = "{MAIL_UID}"
first_valid_uid = {MAIL_UID}
sieve_relay = "127.0.0.1:{p['relay']}"
{extra}"""

    def copy(self) -> Site:
        """The same directory and ports, with a text of its own to change."""
        twin = Site.__new__(Site)
        twin.root, twin.ports, twin.text = self.root, self.ports, self.text
        return twin

    def as_proxy(self) -> Site:
        """The same site seen from a front node: the proxy listens on its own ports and
        forwards to this site's mailbox Dovecot; subscribers without a mailbox host in
        LDAP go to 127.0.0.1 (no DNS in tests)."""
        p = self.ports
        proxy = Site.__new__(Site)
        proxy.root, proxy.ports = self.root, p
        text = self.text.replace(f"imap_port = {p['imap']}\n", f"imap_port = {p['proxy_imap']}\n")
        proxy.text = text.replace(f"pop3_port = {p['pop3']}\n", f"pop3_port = {p['proxy_pop3']}\n") + (
            f'backend_imap_port = {p["imap"]}\nbackend_pop3_port = {p["pop3"]}\n'
            f'default_mailbox_host = "127.0.0.1"\nsasl_path = "inet:127.0.0.1:{p["sasl"]}"\n')
        return proxy

    @property
    def config(self) -> Config:
        """The parsed configuration."""
        return parse_config(self.text, str(self.root / "mailwarden.toml"))

    def write(self) -> Path:
        """The configuration as a file, for the mailwarden daemons and CLI."""
        path = self.root / "mailwarden.toml"
        path.write_text(self.text, encoding="utf-8")
        return path

    def postfix(self, *roles: str) -> dict[str, Rendered]:
        """Render Postfix instances into ROOT/etc; return them by role."""
        written = render_postfix(self.config, roles, self.root / "etc")
        return {w.name.removeprefix("postfix-"): w for w in written}

    def dovecot(self, *roles: str) -> dict[str, Rendered]:
        """Render Dovecot roles into ROOT/etc; return them by role."""
        written = render_dovecot(self.config, roles, self.root / "etc")
        return {w.name.removeprefix("dovecot-"): w for w in written}


def ldap_toml(server: SlapdServer) -> str:
    """[ldap] for the sample directory."""
    return f'[ldap]\nuri = "{server.uri}"\n{SERVICE_BIND}retry_max = 1\nretry_delay = 0.2\n'


def compat_ldap_toml(server: SlapdServer) -> str:
    """The alternative mapping (tests/data/compat.toml) pointing at ``server``."""
    text = (DATA / "compat.toml").read_text()
    return text.replace("[ldap]\n", f'[ldap]\nuri = "{server.uri}"\n', 1)


@contextlib.contextmanager
def site_root() -> Iterator[Path]:
    """A work directory the postfix and dovecot users can traverse (pytest's are root-only)."""
    root = Path(tempfile.mkdtemp(prefix="mw-render-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def site(slapd: SlapdServer) -> Iterator[Site]:
    """A site over the sample directory."""
    with site_root() as root:
        yield Site(root, ldap_toml(slapd))


# ---------------------------------------------------------------- Postfix


def _top_level(value: str) -> list[str]:
    """A main.cf list split at the commas outside ``{ }`` (pipemap:{ a, b } stays whole)."""
    parts, depth, current = [], 0, ""
    for char in value:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in [*parts, current.strip()] if p]


class RenderedPostfix:
    """One rendered instance run with the real Postfix (``postfix -c DIR``)."""

    def __init__(self, site: Site, role: str) -> None:
        self.site = site
        self.role = role
        self.name = f"postfix-{role}"
        self.etc = site.root / "etc" / self.name
        self.queue = site.root / "spool" / self.name
        self.data = site.root / "lib" / self.name
        self.started = False

    def prepare(self) -> None:
        """Create the queue and data directories the rendered main.cf names."""
        self.queue.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")

    def check(self) -> str:
        """``postfix -c DIR check``; return its output (errors only go to a terminal)."""
        self.prepare()
        code, output = run_with_tty(["postfix", "-c", str(self.etc), "check"])
        log = self.site.root / "maillog"
        text = output + (log.read_text() if log.exists() else "")
        assert code == 0, text
        return text

    def postconf(self, *args: str) -> str:
        """``postconf -c DIR ARGS`` (stderr must stay empty: no unused or bad parameters)."""
        res = subprocess.run(["postconf", "-c", str(self.etc), *args], capture_output=True, text=True,
                             check=False, timeout=30)
        assert res.returncode == 0 and not res.stderr, res.stderr
        return res.stdout

    def settings(self) -> dict[str, str]:
        """``postconf -n`` as a dict (continuation lines joined)."""
        out: dict[str, str] = {}
        for line in self.postconf("-n").splitlines():
            name, _, value = line.partition(" = ")
            out[name] = value
        return out

    def services(self) -> dict[str, str]:
        """``postconf -M`` as service/type -> the whole line."""
        out: dict[str, str] = {}
        for line in self.postconf("-M").splitlines():
            fields = line.split()
            out[f"{fields[0]}/{fields[1]}"] = line
        return out

    def lookup(self, table: str, key: str) -> str | None:
        """``postmap -q KEY ldap:TABLE`` against the directory; None when not found."""
        return self.query(f"ldap:{self.etc}/{table}.cf", key)

    def alias(self, key: str) -> str | None:
        """What the instance's ``virtual_alias_maps`` answer first for ``key`` (one step,
        the exact key: Postfix itself retries without an address extension)."""
        maps = self.settings()["virtual_alias_maps"].replace("proxy:", "").replace("$$", "$")
        for spec in _top_level(maps):
            answer = self.query(spec, key)
            if answer is not None:
                return answer
        return None

    def query(self, spec: str, key: str) -> str | None:
        """``postmap -q KEY SPEC`` (any table type); None when not found."""
        res = subprocess.run(["postmap", "-c", str(self.etc), "-q", key, spec],
                             capture_output=True, text=True, check=False, timeout=30)
        if res.returncode == 1 and not res.stderr:
            return None
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def set(self, **values: str) -> None:
        """Test-only overrides (``postconf -e``), e.g. to keep Postfix off DNS."""
        self.postconf("-e", *(f"{k}={v}" for k, v in values.items()))

    def start(self) -> None:
        """``postfix -c DIR start`` (returns once the listeners are open)."""
        self.check()
        code, output = run_with_tty(["postfix", "-c", str(self.etc), "start"])
        assert code == 0, output
        self.started = True

    def stop(self) -> None:
        """``postfix -c DIR stop`` for this instance only."""
        if self.started:
            run_with_tty(["postfix", "-c", str(self.etc), "stop"])
            self.started = False

    def log(self) -> str:
        """The shared maillog of the site's instances."""
        path = self.site.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


class POP3From(poplib.POP3):
    """A POP3 client bound to a given loopback source address (another client IP)."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def pop3_login(port: int, user: str, password: str = "secret", source: str = "127.0.0.1") -> bytes:
    """Log in over POP3 from ``source``; return the server's answer to PASS."""
    pop = POP3From(port, source)
    try:
        pop.user(user)
        return pop.pass_(password)
    finally:
        with contextlib.suppress(poplib.error_proto, OSError):
            pop.quit()


def self_signed(site: Site) -> None:
    """A throw-away certificate at the site's tls_cert_file / tls_key_file."""
    tls = site.root / "tls"
    tls.mkdir(exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=front1.mailwarden.test", "-keyout", str(tls / "key.pem"), "-out", str(tls / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )


# ---------------------------------------------------------------- Dovecot and daemons


class RenderedDovecot:
    """A rendered Dovecot role run in the foreground (``dovecot -F``), stopped by PID."""

    def __init__(self, site: Site, role: str) -> None:
        self.site = site
        self.role = role
        self.conf = site.root / "etc" / f"dovecot-{role}" / "dovecot.conf"
        self.log_path = site.root / f"dovecot-{role}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *ports: int) -> None:
        """Compile the Sieve script, start Dovecot and wait for ``ports``."""
        for path in (self.site.root / "mail", self.site.root / "index"):
            path.mkdir(exist_ok=True)
            os.chown(path, MAIL_UID, MAIL_UID)
        sieve = self.conf.parent / "sieve" / "mailwarden.sieve"
        if sieve.exists():
            res = subprocess.run(["sievec", "-c", str(self.conf), str(sieve)], capture_output=True,
                                 text=True, check=False, timeout=30)
            assert res.returncode == 0 and not res.stderr, res.stderr
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for port in ports:
            try:
                wait_port(port, self.proc)
            except RuntimeError as exc:
                self.stop()  # never leave a half-started Dovecot behind
                raise RuntimeError(f"{exc}\n{self.log()[-3000:]}") from None

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``doveadm -c CONF ARGS``."""
        return subprocess.run(["doveadm", "-c", str(self.conf), *args], capture_output=True, text=True,
                              check=False, timeout=30)

    def userdb(self, user: str) -> dict[str, str] | None:
        """The userdb fields Dovecot finds for ``user`` (None: no such user)."""
        res = self.doveadm("user", user)
        if res.returncode == 67:
            return None
        assert res.returncode == 0, res.stderr
        return dict(line.split("\t", 1) for line in res.stdout.splitlines()[1:] if "\t" in line)

    def log(self) -> str:
        """Dovecot's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the master (our child), then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Daemon:
    """``mailwarden ... run`` as a child process, stopped by its PID."""

    def __init__(self, site: Site, *command: str, grace: float = 15.0) -> None:
        self.site = site
        self.command = command
        self.grace = grace
        self.log_path = site.root / f"{'-'.join(command[:1])}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None, socket_path: Path | None = None) -> None:
        """Start and wait until the port or socket answers."""
        config = self.site.write()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([MAILWARDEN, "-c", str(config), *self.command],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            if port is not None:
                wait_port(port, self.proc)
            deadline = time.monotonic() + 15
            while socket_path is not None and not socket_path.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{socket_path} did not appear")
                time.sleep(0.05)
        except RuntimeError as exc:
            self.stop()  # never leave a half-started daemon behind
            raise RuntimeError(f"{exc}\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        """What the daemon wrote."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM by PID, then wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def start_milter(site: Site) -> Daemon:
    """The real milter, its socket where Postfix's smtpd (user postfix) can reach it.

    The directory is made as the systemd unit makes it: group postfix with the
    setgid bit, so the socket (milter.socket_mode 0660) belongs to group postfix.
    """
    directory = site.root / "milter"
    directory.mkdir(exist_ok=True)
    shutil.chown(directory, group="postfix")
    directory.chmod(0o2750)
    milter = Daemon(site, "milter", "run", grace=1.0)
    milter.start(socket_path=directory / "milter.sock")
    return milter


@pytest.fixture
def running() -> Iterator[list[RenderedPostfix | RenderedDovecot | Daemon]]:
    """Things a test started; stopped at the end in reverse order."""
    started: list[RenderedPostfix | RenderedDovecot | Daemon] = []
    yield started
    for item in reversed(started):
        item.stop()
