"""Real clamd and spamd for the session, and the milter run as its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.clamd import ClamdServer
from harness.postfix import PostfixInstance
from harness.slapd import SERVICE_BIND
from harness.spamd import SpamdServer


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdServer]:
    """A real clamd (3 local test signatures) for the session; tests must restart it if they stop it."""
    server = ClamdServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def spamd() -> Iterator[SpamdServer]:
    """A real spamd (shipped rules, network tests off) for the session."""
    server = SpamdServer().start()
    yield server
    server.cleanup()


class MilterProcess:
    """``mailwarden milter run`` as a child process on a unix socket in ``workdir``."""

    def __init__(self, workdir: Path, sections: str, milter_keys: str, *, node_name: str = "test-node",
                 quarantine_dir: Path | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.socket_path = self.dir / "milter.sock"
        self.config_path = self.dir / "mailwarden.toml"
        self.log_path = self.dir / "milter.log"
        if "sender_auth" not in milter_keys:
            # No DNS here: sender authentication has its own tests against a stub DNS.
            milter_keys += "\nsender_auth = false"
        self.config_path.write_text(
            f'[general]\nnode_name = "{node_name}"\n{sections}\n'
            f'[milter]\nsocket = "unix:{self.socket_path}"\nspool_dir = "{self.dir}/spool"\n'
            f'quarantine_dir = "{quarantine_dir or self.dir / "quarantine"}"\n'
            f'template_dir = "{self.dir}/templates"\n'
            f"{milter_keys}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> MilterProcess:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from mailwarden.cli import main; main()",
                 "--config", str(self.config_path), "milter", "run"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"milter did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket_path))
            return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_notices(self, timeout: float = 10.0) -> None:
        """Wait until every notice the log shows as queued has its own line (sent or not):
        notices leave after the reply, and must not land in the next test's sink."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            queued = sum(line.count(":queued") for line in text.splitlines() if " notices=" in line)
            handled = text.count(": notice ")
            if handled >= queued:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{queued - handled} notice(s) still waiting:\n{text[-3000:]}")
            time.sleep(0.02)

    def wait_for_log(self, text: str, timeout: float = 10.0, since: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log()[since:].splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no milter log line with {text!r}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def archive_section(lmtp_port: int) -> str:
    """[render] sending archive copies to an LMTP service on loopback (the sample data's
    example.com archives into archive@example.com, which names no mailbox host)."""
    return f'[render]\ndefault_mailbox_host = "127.0.0.1"\nmailbox_port = {lmtp_port}\n'


def base_sections(*, ldap_uri: str, store_path: Path | None = None, store: str = "") -> str:
    """[ldap] and [store] for a milter process: the SQLite file ``store_path``, or the
    [store] keys ``store``."""
    store = store or f'backend = "sqlite"\nsqlite_path = "{store_path}"\n'
    return (
        f'[ldap]\nuri = "{ldap_uri}"\n{SERVICE_BIND}retry_max = 1\nretry_delay = 0.2\n'
        f'network_timeout = 1.0\ntimeout = 2.0\n[store]\n{store}'
    )


LOCAL_DOMAINS = "example.jp example.ne.jp example.com lab.example.org bare.example.net"
"""The sample directory's hosted domains, as a Postfix MX relays them."""
REINJECT_OPTIONS = {
    "smtpd_milters": "",
    "receive_override_options": "no_milters",
    "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
    "smtpd_client_restrictions": "",
    "smtpd_helo_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_recipient_restrictions": "permit_mynetworks,reject",
    "smtpd_relay_restrictions": "permit_mynetworks,reject",
    "mynetworks": "127.0.0.0/8",
}
"""The re-injection smtpd the milter hands variants, notices and releases to."""


def milter_behind_mx(work: Path, sections: str, milter_lines: str, *, relayhost: str, myhostname: str,
                     clamd: str, spamd: str) -> tuple[MilterProcess, PostfixInstance]:
    """A milter process (``sections`` plus ``[milter]`` ``milter_lines``; clamd and spamd at
    those addresses, no scan cache) behind a real Postfix MX relaying the hosted domains to
    ``relayhost``, with its re-injection smtpd; both started."""
    milter = MilterProcess(work / "milter", sections, milter_lines)
    mx = PostfixInstance(main_cf={
        "relay_domains": LOCAL_DOMAINS, "relayhost": relayhost,
        "smtpd_milters": f"unix:{milter.socket_path}", "milter_protocol": "6",
        "milter_default_action": "tempfail", "mynetworks": "127.0.0.0/8",
    }, myhostname=myhostname)
    reinject_port = mx.add_smtpd(REINJECT_OPTIONS)
    milter.config_path.write_text(milter.config_path.read_text() + (
        f'socket_mode = "0666"\nclamd = ["{clamd}"]\nspamd = ["{spamd}"]\n'
        f'reinject = "inet:127.0.0.1:{reinject_port}"\nscan_cache_ttl = 0\n'
    ))
    milter.start()
    milter.wait_for_log("milter listening on")
    mx.start()
    return milter, mx
