"""Fixtures for the end-to-end tests: real Postfix, Dovecot and a recording sink.

Each module gets its own daemons (module scope) so that a module may restart or
reconfigure them; tests inside a module share them and look only at what happened
after they began (``log_offset()``, ``sink.clear()``).
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dovecot import DovecotServer, missing_dovecot
from harness.postfix import missing_postfix
from harness.process import TestDaemon, log_size, read_log, tail
from harness.slapd import SlapdServer
from harness.smtpsink import SmtpSink

MISSING = missing_postfix() or missing_dovecot()
MAILWARDEN = Path(sys.executable).parent / "mailwarden"

# The sample directory's hosted domains (ldap/sample.ldif).
HOSTED_DOMAINS = "example.jp example.ne.jp example.com lab.example.org bare.example.net"


def skip_without_mail_stack() -> pytest.MarkDecorator:
    """Skip a module cleanly when Postfix or Dovecot cannot run here."""
    return pytest.mark.skipif(MISSING is not None, reason=f"end-to-end: {MISSING}")


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    """"The Internet": every message Postfix relays out ends up here."""
    with SmtpSink() as server:
        yield server


@pytest.fixture(scope="module")
def dovecot(slapd: SlapdServer) -> Iterator[DovecotServer]:
    """Dovecot authenticating against the shared (read-only) sample slapd."""
    with DovecotServer(slapd.uri) as server:
        yield server


class PolicydProcess(TestDaemon):
    """``mailwarden --config FILE policyd run`` as a child process, stopped by its PID.

    Its log (stderr) goes to ``log_path``; ``start()`` returns once both the policy
    socket and the login-report endpoint accept connections.
    """

    name = "policyd"

    def __init__(self, config_path: Path, policy_port: int, report_port: int) -> None:
        self.config_path = config_path
        self.policy_port = policy_port
        self.report_port = report_port
        self.log_path = config_path.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        """The check_policy_service endpoint."""
        return f"inet:127.0.0.1:{self.policy_port}"

    @property
    def report_url(self) -> str:
        """The URL Dovecot reports logins to."""
        return f"http://127.0.0.1:{self.report_port}/"

    def start(self, timeout: float = 15.0) -> PolicydProcess:
        """Start and wait until the policy socket and the login-report endpoint listen."""
        self.launch([str(MAILWARDEN), "--config", str(self.config_path), "policyd", "run"], self.log_path,
                    lambda: _listening(self.policy_port) and _listening(self.report_port), timeout=timeout)
        return self

    def log_offset(self) -> int:
        return log_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        return read_log(self.log_path, since)

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_text(), lines)

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while (found := regex.search(self.log_text(since))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"policyd log: no {pattern!r} within {timeout:g}s:\n"
                                   + tail(self.log_text(since), 30))
            time.sleep(0.05)
        return found


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
