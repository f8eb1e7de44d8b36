"""Operating the live stack: ``mailwarden trace`` follows a real message through the
policy daemon, the milter, a re-injected variant and delivery; ``mailwarden selftest``
probes the real backends, then each one stopped.

The stack is the milter's end-to-end rig (tests/milter/test_e2e.py: real Postfix, slapd,
clamd, spamd, the milter as its own process), built anew for this module, with the
policy daemon added in front and a real redis-server and stub DNS for the self-test.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.clamd import EICAR, ClamdServer
from harness.dnsstub import StubDns
from harness.ports import free_port
from harness.redisserver import RedisServer
from harness.slapd import SlapdServer
from harness.spamd import SpamdServer
from mailwarden.logfields import is_mwid
from milters.signing import generate_key
from tests.e2e.conftest import MAILWARDEN, PolicydProcess
from tests.milter.conftest import base_sections
from tests.milter.test_e2e import Stack, directory, message, stack

__all__ = ["directory", "stack"]  # the rig's fixtures, used here

pytestmark = [pytest.mark.e2e, pytest.mark.slapd, pytest.mark.redis]


def mailwarden(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``mailwarden`` command, as an operator runs it."""
    argv = [str(MAILWARDEN), *(("--config", str(config)) if config else ()), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mw-ops-") as name:
        yield Path(name)


@pytest.fixture(scope="module")
def dns() -> Iterator[StubDns]:
    with StubDns() as server:
        server.add("example.jp", "MX", "10 mx.example.jp.")
        yield server


@pytest.fixture(scope="module")
def policyd(stack: Stack, directory: SlapdServer, dns: StubDns, work: Path) -> Iterator[PolicydProcess]:
    """The policy daemon in front of the stack's MX, logging every decision."""
    policy_port, report_port = free_port(), free_port()
    config = work / "policyd.toml"
    config.write_text(
        '[general]\nnode_name = "test-node"\n'
        + base_sections(ldap_uri=directory.uri, store_path=work / "policyd.sqlite3")
        + f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout = 0.5\nlifetime = 1.0\n'
        f'[policyd]\nlisten = ["inet:127.0.0.1:{policy_port}"]\n'
        f'login_report_listen = ["inet:127.0.0.1:{report_port}"]\nlog_decisions = "all"\n'
    )
    server = PolicydProcess(config, policy_port, report_port).start()
    check = f"check_policy_service {server.endpoint}"
    stack.mx.postconf(smtpd_recipient_restrictions=f"{check}, permit_mynetworks, reject_unauth_destination",
                      smtpd_end_of_data_restrictions=check)
    stack.mx.restart()
    yield server
    server.stop()


def test_trace_follows_a_message_through_policyd_milter_reinjection_and_delivery(
        stack: Stack, policyd: PolicydProcess) -> None:
    """junky (spam check, junk folder) gets a re-injected variant, bob keeps the queued copy."""
    result = stack.send(message(subject="quarterly report"), "junky@example.com", "bob@example.com")
    assert result.accepted and result.queue_id
    stack.copies(2)
    junky, bob = stack.copy_for("junky@example.com"), stack.copy_for("bob@example.com")
    mwid = bob.header("X-Mailwarden-Id") or ""
    assert is_mwid(mwid) and junky.header("X-Mailwarden-Id") == mwid
    stack.mx.wait_queue_empty()
    line = stack.milter.wait_for_log(f"mwid={mwid}")
    reinjected = re.search(r"reinjected=(\w+)", line)
    assert reinjected is not None
    copy_id = reinjected.group(1)
    stack.mx.wait_for_log(rf"{copy_id}: to=<junky@example\.com>.*status=sent")
    policyd.wait_for_log(rf"queue_id={result.queue_id} instance=\S+ stage=END-OF-MESSAGE")
    logs = [a for path in (stack.mx.log_path, stack.milter.log_path, policyd.log_path)
            for a in ("--logs", str(path))]

    traced = [mailwarden(None, "trace", wanted, *logs) for wanted in (result.queue_id, mwid, copy_id)]
    assert all(t.returncode == 0 for t in traced), traced[0].stderr
    assert traced[0].stdout == traced[1].stdout == traced[2].stdout  # any of its ids finds all of it
    summary, *events = traced[0].stdout.splitlines()
    assert summary.startswith(f"queue ids: {result.queue_id}, {copy_id}; mailwarden ids: {mwid}")

    def at(pattern: str) -> int:
        found = [i for i, e in enumerate(events) if re.search(pattern, e)]
        assert len(found) == 1, f"{pattern!r}:\n" + "\n".join(events)
        return found[0]

    # The policy daemon's answers: both recipients (the first before Postfix opened the
    # queue file, NOQUEUE, tied by Postfix's instance), then the end of the message; the
    # harness's re-injection smtpd inherits the end-of-data check, so the copy has one too.
    rcpt = [at(r"queue_id=NOQUEUE .*stage=RCPT .*to=<junky@example\.com> action="),
            at(rf"queue_id={result.queue_id} .*stage=RCPT .*to=<bob@example\.com> action=")]
    eom = at(rf"queue_id={result.queue_id} .*stage=END-OF-MESSAGE")
    at(rf"queue_id={copy_id} .*stage=END-OF-MESSAGE")
    assert traced[0].stdout.count(" mailwarden/policyd[") == 4
    milter = at(rf"mailwarden/milter\[\d+\]: {result.queue_id}: accept mwid={mwid} ")
    assert "junky@example.com=deliver" in events[milter] and "spam=" in events[milter]
    injected = at(rf"{copy_id}: client=.*orig_queue_id={result.queue_id}")
    delivered = [at(rf"{result.queue_id}: to=<bob@example\.com>.*status=sent"),
                 at(rf"{copy_id}: to=<junky@example\.com>.*status=sent")]
    assert max(rcpt) < injected < min(delivered), "\n".join(events)
    assert max(rcpt) < eom < milter < min(delivered), "\n".join(events)

    as_json = mailwarden(None, "trace", result.queue_id, "--json", *logs)
    assert as_json.returncode == 0 and f'"mwid": "{mwid}"' in as_json.stdout


def test_trace_of_a_refused_message_shows_the_reply_the_client_saw(
        stack: Stack, policyd: PolicydProcess) -> None:
    """Refused at the end of DATA: the sender only knows its Message-ID, which finds it."""
    msg = message(body=EICAR.decode() + "\n")
    msg["Message-ID"] = "<eicar-for-trace@remote.example>"
    result = stack.send(msg, "taro@example.jp")
    assert result.data[0] == 550
    stack.mx.wait_for_log(r"milter-reject: END-OF-MESSAGE")
    stack.milter.wait_for_notices()
    logs = [a for path in (stack.mx.log_path, stack.milter.log_path, policyd.log_path)
            for a in ("--logs", str(path))]
    traced = mailwarden(None, "trace", "<eicar-for-trace@remote.example>", *logs)
    assert traced.returncode == 0, traced.stderr
    summary, *events = traced.stdout.splitlines()
    assert "message-id: <eicar-for-trace@remote.example>" in summary
    [milter] = [e for e in events if " mailwarden/milter[" in e and ": reject mwid=" in e]
    assert 'reply="550 5.7.1 Message refused: virus Custom.Test.EICAR' in milter
    [refused] = [e for e in events if "milter-reject: END-OF-MESSAGE" in e]
    assert "5.7.1 Message refused: virus Custom.Test.EICAR" in refused
    assert events.index(milter) < events.index(refused)
    assert any("stage=RCPT" in e and "to=<taro@example.jp>" in e for e in events)


# ---------------------------------------------------------------- selftest


def selftest(config: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    """The exit status and each row as (status, rest of the row, its fix line)."""
    done = mailwarden(config, "selftest")
    rows: dict[str, tuple[str, str]] = {}
    name = ""
    for line in done.stdout.splitlines()[1:]:
        if line.startswith(" "):
            rows[name] = (rows[name][0], rows[name][1] + "\n" + line.strip())
        else:
            name, status, rest = line.split(None, 2)
            rows[name] = (status, rest)
    return done.returncode, rows


def test_selftest_against_the_live_stack_and_each_backend_stopped(
        stack: Stack, directory: SlapdServer, clamd: ClamdServer, spamd: SpamdServer, dns: StubDns,
        work: Path) -> None:
    reinject = re.search(r'reinject = "([^"]+)"', stack.milter.config_path.read_text())
    assert reinject is not None
    keys = work / "dkim"
    keys.mkdir()
    (keys / "example.jp.mw1-ed25519.key").write_bytes(generate_key("ed25519")[0])
    with RedisServer() as redis:
        config = work / "selftest.toml"
        config.write_text(
            '[general]\nnode_name = "test-node"\nselftest_address = "taro@example.jp"\n'
            + base_sections(ldap_uri=directory.uri, store=f'backend = "redis"\nredis_url = "{redis.url}"\n')
            + f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout = 0.5\nlifetime = 1.0\n'
            f'[milter]\nclamd = ["{clamd.unix_address}"]\nspamd = ["{spamd.address}"]\n'
            f'reinject = "{reinject.group(1)}"\ndkim_key_path = "{keys}/{{domain}}.{{selector}}.key"\n'
            f'clamd_timeout = 10.0\nspamd_timeout = 10.0\nupstream_retry = 0.0\n'
        )
        status, rows = selftest(config)
        assert status == 0, rows
        assert list(rows) == ["ldap", "store", "dns", "clamd", "spamd", "rspamd", "reinject", "dkim"]
        assert {r[0] for r in rows.values()} == {"ok"}
        assert "taro@example.jp is uid=taro," in rows["ldap"][1]
        assert "EICAR found" in rows["clamd"][1] and "GTUBE scored 100" in rows["spamd"][1]
        assert rows["rspamd"][1] == "not used (spam_engine = spamd)"
        assert "XFORWARD" in rows["reinject"][1] and "1 key(s) readable" in rows["dkim"][1]

        # A key that cannot sign: misconfigured (78), whatever else is down.
        bad = keys / "example.jp.broken.key"
        bad.write_text("not a key\n")
        status, rows = selftest(config)
        assert status == 78 and rows["dkim"][0] == "misconfigured" and "keygen" in rows["dkim"][1]
        bad.unlink()

        def stopped(name: str, hint: str) -> None:
            status, rows = selftest(config)
            assert status == 75, rows
            assert rows[name][0] == "unavailable" and f"fix: {hint}" in rows[name][1], rows[name]
            assert rows["dkim"][0] == "ok"

        clamd.stop()
        try:
            stopped("clamd", "is clamd running?")
        finally:
            clamd.start()
        spamd.stop()
        try:
            stopped("spamd", "is spamd running?")
        finally:
            spamd.start()
        # Each of these stays stopped: the rows before turn red one by one.
        redis.stop()
        stopped("store", "is redis-server running?")
        dns.stop()
        stopped("dns", "is the resolver running")
        directory.stop()
        stopped("ldap", "is slapd running")
        stack.mx.stop()
        stopped("reinject", "is Postfix running")
        _, rows = selftest(config)
        assert [n for n, r in rows.items() if r[0] == "ok"] == ["clamd", "spamd", "rspamd", "dkim"]
