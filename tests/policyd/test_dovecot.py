"""The Dovecot login-report endpoint: over HTTP, and driven by a real Dovecot."""

from __future__ import annotations

import http.client
import imaplib
import json
import os
import poplib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.ports import free_port
from policyd.config import PolicydConfig
from tests.policyd.conftest import LogLines, PolicyClient, RunningServer

OUT = "friend@remote.example"


@pytest.fixture
def endpoint(start_daemon: Callable[..., RunningServer]) -> Callable[..., tuple[RunningServer, int]]:
    def start(extra: str = "") -> tuple[RunningServer, int]:
        port = free_port()
        server = start_daemon(f'checks = ["relay"]\ntrusted_networks = []\n{extra}', login_port=port)
        return server, port

    return start


def post(port: int, report: dict[str, object] | bytes, *, headers: dict[str, str] | None = None,
         command: str = "report", conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = report if isinstance(report, bytes) else json.dumps(report).encode()
    c.request("POST", f"/?command={command}", body=body,
              headers={"Content-Type": "application/json", **(headers or {})})
    resp = c.getresponse()
    return resp.status, resp.read()


REPORT = {"login": "pbs@example.jp", "user": "pbs@example.jp", "remote": "198.51.100.7",
          "protocol": "pop3", "success": True, "policy_reject": False, "tls": False}


def relay_answer(server: RunningServer, ip: str) -> str:
    return PolicyClient(PolicydConfig.of(server.app.config).listen[0]).ask(
        recipient=OUT, client_address=ip, sender="pbs@example.jp", instance=f"i{time.monotonic()}")


def test_successful_pop3_login_opens_a_window_with_the_subscribers_ttl(
    endpoint: Callable[..., tuple[RunningServer, int]], daemon_log: LogLines,
) -> None:
    server, port = endpoint()
    assert relay_answer(server, "198.51.100.7").startswith("554")
    assert post(port, REPORT) == (200, b'{"status":0,"msg":"ok"}')
    daemon_log.wait_for("window opened for pbs@example.jp from [198.51.100.7] for 600 s")
    assert relay_answer(server, "198.51.100.7") == "OK"
    ((ip, user, left),) = list(server.app.services.pbs.windows())
    assert (ip, user) == ("198.51.100.7", "pbs@example.jp") and 590 < (left or 0) <= 600


@pytest.mark.parametrize(("change", "why"), [
    ({"success": False}, "login failed"),
    ({"protocol": "smtp"}, "protocol smtp"),
    ({"user": "bob@example.com", "login": "bob@example.com"}, "no pop_before_smtp service"),
    ({"user": "jiro@example.jp", "login": "jiro@example.jp"}, "is disabled"),
    ({"user": "ghost@example.jp", "login": "ghost@example.jp"}, "not a subscriber"),
    ({"remote": "not-an-ip"}, "not an IP address"),
])
def test_reports_that_must_not_open_a_window(
    endpoint: Callable[..., tuple[RunningServer, int]], daemon_log: LogLines,
    change: dict[str, object], why: str,
) -> None:
    server, port = endpoint()
    assert post(port, {**REPORT, **change})[0] == 200
    daemon_log.wait_for(why)
    assert list(server.app.services.pbs.windows()) == []


def test_allow_commands_and_junk_are_answered_without_effect(
    endpoint: Callable[..., tuple[RunningServer, int]], daemon_log: LogLines,
) -> None:
    server, port = endpoint()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert post(port, REPORT, command="allow", conn=conn) == (200, b'{"status":0,"msg":"ok"}')
    assert post(port, b"{not json", conn=conn)[0] == 200  # same keep-alive connection
    daemon_log.wait_for("not JSON")
    assert post(port, b"[1, 2]", conn=conn)[0] == 200
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 405
    resp.read()
    assert list(server.app.services.pbs.windows()) == []


def test_shared_secret_header_is_required_when_configured(
    endpoint: Callable[..., tuple[RunningServer, int]], daemon_log: LogLines,
) -> None:
    server, port = endpoint('login_report_header = "X-Mailwarden-Key: s3cret"\n')
    assert post(port, REPORT)[0] == 401
    assert post(port, REPORT, headers={"X-Mailwarden-Key": "wrong"})[0] == 401
    daemon_log.wait_for("missing or wrong x-mailwarden-key header")
    assert list(server.app.services.pbs.windows()) == []
    assert post(port, REPORT, headers={"X-Mailwarden-Key": "s3cret"})[0] == 200
    assert relay_answer(server, "198.51.100.7") == "OK"


def test_login_without_domain_gets_login_domain(
    endpoint: Callable[..., tuple[RunningServer, int]],
) -> None:
    server, port = endpoint('login_domain = "example.jp"\n')
    assert post(port, {**REPORT, "user": "pbs", "login": "pbs"})[0] == 200
    assert relay_answer(server, "198.51.100.7") == "OK"


# ---------------------------------------------------------------- real Dovecot

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin")


@pytest.fixture
def dovecot(endpoint: Callable[..., tuple[RunningServer, int]]) -> Iterator[tuple[RunningServer, int, int]]:
    """Dovecot (POP3 + IMAP, passwd-file users) reporting logins to a running policyd."""
    if DOVECOT is None or os.geteuid() != 0:
        pytest.skip("dovecot (run as root) is needed")
    server, report_port = endpoint()
    # Dovecot's unprivileged login processes must reach base_dir: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="mw-dovecot-"))
    root.chmod(0o755)
    (root / "mail").mkdir()
    os.chown(root / "mail", 5000, 5000)
    pop3, imap = free_port(), free_port()
    (root / "users").write_text(
        "".join(f"{u}:{{PLAIN}}secret:5000:5000::{root}/mail/{u}\n"
                for u in ("pbs@example.jp", "bob@example.com"))
    )
    (root / "dovecot.conf").write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
protocols = pop3 imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {root}/dovecot.log
first_valid_uid = 5000
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
# docs/policyd.md, "Dovecot wiring"
auth_policy_server_url = http://127.0.0.1:{report_port}/
auth_policy_request_attributes = login=%{{requested_username}} user=%{{user}} remote=%{{rip}} protocol=%s
auth_policy_check_before_auth = no
auth_policy_check_after_auth = no
auth_policy_report_after_auth = yes
auth_policy_reject_on_fail = no
auth_policy_server_timeout_msecs = 2000
auth_policy_hash_nonce = test-nonce
auth_failure_delay = 0
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                poplib.POP3("127.0.0.1", pop3, timeout=1).quit()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"dovecot exited: {(root / 'dovecot.log').read_text(errors='replace')}")
                time.sleep(0.05)
        yield server, pop3, imap
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_real_dovecot_pop3_and_imap_logins_open_the_window(
    dovecot: tuple[RunningServer, int, int], daemon_log: LogLines,
) -> None:
    server, pop3, imap = dovecot
    assert relay_answer(server, "127.0.0.1").startswith("554")
    bad = poplib.POP3("127.0.0.1", pop3, timeout=10)
    bad.user("pbs@example.jp")
    with pytest.raises(poplib.error_proto):
        bad.pass_("wrong")
    daemon_log.wait_for("login report pop3 'pbs@example.jp' [127.0.0.1]: ignored: login failed", timeout=10)
    assert relay_answer(server, "127.0.0.1").startswith("554")
    box = poplib.POP3("127.0.0.1", pop3, timeout=10)
    box.user("pbs@example.jp")
    box.pass_("secret")
    box.quit()
    daemon_log.wait_for("window opened for pbs@example.jp from [127.0.0.1] for 600 s")
    assert relay_answer(server, "127.0.0.1") == "OK"
    server.app.services.pbs.close("127.0.0.1")
    assert relay_answer(server, "127.0.0.1").startswith("554")
    conn = imaplib.IMAP4("127.0.0.1", imap, timeout=10)
    conn.login("pbs@example.jp", "secret")
    conn.logout()
    daemon_log.wait_for("login report imap 'pbs@example.jp' [127.0.0.1]: window opened")
    assert relay_answer(server, "127.0.0.1") == "OK"


def test_real_dovecot_login_of_a_subscriber_without_the_service_opens_nothing(
    dovecot: tuple[RunningServer, int, int], daemon_log: LogLines,
) -> None:
    server, pop3, _ = dovecot
    box = poplib.POP3("127.0.0.1", pop3, timeout=10)
    box.user("bob@example.com")
    box.pass_("secret")
    box.quit()
    daemon_log.wait_for("bob@example.com has no pop_before_smtp service")
    assert list(server.app.services.pbs.windows()) == []
