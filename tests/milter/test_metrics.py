"""The milter's /metrics: a real ``mailwarden milter run`` with two workers, scraped over HTTP.

The directory is the session's slapd; clamd and spamd are fakes (the first clamd upstream
is dead, so every worker fails over once).  The counters must add up to the mail sent
whichever worker took it, and keep what a killed worker counted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from miltertest import constants as c

from harness.clamd import EICAR, FakeClamd
from harness.ports import free_port
from harness.scrape import Samples, scrape, total, wait_for
from harness.slapd import SlapdServer
from harness.smtpsink import SmtpSink
from harness.spamd import FakeSpamd
from tests.milter.conftest import MilterProcess, base_sections
from tests.milter.helpers import make_message
from tests.milter.mta import EomResult, MtaSession

pytestmark = pytest.mark.slapd


class Node:
    def __init__(self, milter: MilterProcess, clamd: FakeClamd, spamd: FakeSpamd, url: str) -> None:
        self.milter, self.clamd, self.spamd, self.url = milter, clamd, spamd, url

    def send(self, raw: bytes, *recipients: str, times: int = 1) -> EomResult:
        """``times`` messages on one connection (so one worker); the last result."""
        s = MtaSession(self.milter.socket_path)
        try:
            s.connect()
            s.helo()
            for _ in range(times):
                result = s.message("s@remote.example", list(recipients), raw)
                assert isinstance(result, EomResult), result
        finally:
            s.close()
        return result

    def workers(self) -> list[int]:
        pids = re.findall(r"2 workers started \(pids (\d+) (\d+)\)", self.milter.log())
        assert pids, self.milter.log()
        return [int(p) for p in pids[0]]


@pytest.fixture(scope="module")
def node(slapd: SlapdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("milter-metrics")
    port = free_port()
    with (FakeClamd() as clamd, FakeSpamd(score=1.0) as spamd, SmtpSink() as sink,
          pytest.MonkeyPatch.context() as mp):
        mp.setenv("TMPDIR", str(work))  # where the daemon makes its multiprocess directory
        milter = MilterProcess(
            work, base_sections(ldap_uri=slapd.uri, store_path=work / "state.sqlite3"),
            f'workers = 2\nmta_timeout = 3\nmetrics_listen = "127.0.0.1:{port}"\n'
            f'clamd = ["unix:{work}/dead-clamd.sock", "{clamd.address}"]\nclamd_timeout = 1.0\n'
            f'spamd = ["{spamd.address}"]\nspamd_timeout = 1.0\nupstream_retry = 60\n'
            f'reinject = "inet:127.0.0.1:{sink.port}"\nscan_cache_ttl = 3600\n',
        ).start()
        milter.wait_for_log("(2 worker(s)")
        yield Node(milter, clamd, spamd, f"http://127.0.0.1:{port}/metrics")
        milter.stop()
    assert not list(work.glob("mailwarden-milter-metrics-*")), "the multiprocess directory is removed"


def test_metrics_off_by_default_the_config_says_so() -> None:
    from milters.config import MilterConfig

    assert MilterConfig().metrics_listen == ""


def test_counters_add_up_over_both_workers_and_survive_a_dead_one(node: Node) -> None:
    clean = [make_message(body=f"hello {i}\n").as_bytes() for i in range(8)]
    with ThreadPoolExecutor(4) as pool:  # concurrent sessions: both workers take some
        results = list(pool.map(lambda raw: node.send(raw, "taro@example.jp"), clean))
    assert all(r.final == c.SMFIR_ACCEPT for r in results)
    virus = make_message(body=EICAR.decode()).as_bytes()
    # Twice on one connection: the second is answered by that worker's scan cache.
    assert node.send(virus, "taro@example.jp", times=2).reply.startswith("550")
    node.spamd.score = 30.0  # over taro's spam_reject_score
    assert node.send(make_message(body="buy now\n").as_bytes(), "taro@example.jp").reply.startswith("550")
    node.spamd.score = 1.0
    node.spamd.mode = "error"
    assert node.send(make_message(body="spamd down\n").as_bytes(), "taro@example.jp").reply.startswith("451")
    node.spamd.mode = "ok"

    def settled(s: Samples) -> bool:
        return total(s, "mailwarden_milter_cache_requests_total", cache="scan") >= 12

    s = wait_for(node.url, settled)
    messages = "mailwarden_milter_messages_total"
    assert total(s, messages, verdict="accept") == 8
    assert total(s, messages, verdict="reject") == 3
    assert total(s, messages, verdict="tempfail") == 1
    recipients = "mailwarden_milter_recipients_total"
    assert total(s, recipients, action="reject", filter="virus") == 2
    assert total(s, recipients, action="reject", filter="spam") == 1
    assert total(s, recipients, action="tempfail", filter="spam") == 1
    assert total(s, recipients, action="deliver", filter="none") == 8
    assert total(s, "mailwarden_milter_tempfails_total", cause="spam") == 1
    findings = "mailwarden_milter_findings_total"
    assert total(s, findings, filter="virus", result="found") == 2
    assert total(s, findings, filter="virus", result="clean") == 10
    assert total(s, findings, filter="spam", result="spam") == 1
    assert total(s, findings, filter="spam", result="error") == 1
    assert total(s, "mailwarden_milter_cache_requests_total", cache="scan", result="hit") == 1
    assert total(s, "mailwarden_milter_cache_requests_total", cache="scan") == 12
    seconds = "mailwarden_milter_backend_seconds_count"
    assert total(s, seconds, backend="clamd") == 11  # the repeated EICAR body came from the cache
    assert total(s, seconds, backend="spamd") == 10  # the two viruses never reached spamd
    assert total(s, "mailwarden_milter_backend_errors_total", backend="spamd") == 1
    assert total(s, seconds, backend="ldap") >= 1
    policy = total(s, "mailwarden_milter_cache_requests_total", cache="policy")
    assert policy >= 12
    # The dead first clamd: each scan in flight before a worker put it aside failed over.
    assert 1 <= total(s, "mailwarden_milter_backend_failovers_total", backend="clamd") <= 8
    assert total(s, "mailwarden_milter_message_seconds_count") == 12
    assert ("mailwarden_milter_quarantine_messages", ()) in s
    assert not any(k[1] and any("@" in v for _, v in k[1]) for k in s), "no address in a label"

    # One worker dies: the parent starts another, the node's counters keep its share.
    victim = node.workers()[0]
    os.kill(victim, signal.SIGKILL)
    node.milter.wait_for_log("starting another")
    time.sleep(0.2)
    for i in range(2):
        result = node.send(make_message(body=f"after {i}\n").as_bytes(), "taro@example.jp")
        assert result.final == c.SMFIR_ACCEPT
    s = wait_for(node.url, lambda s: total(s, messages, verdict="accept") >= 10)
    assert total(s, messages, verdict="accept") == 10
    assert total(s, messages) == 14


def test_open_sessions_are_a_gauge_of_the_node(node: Node) -> None:
    sessions = []
    for _ in range(3):
        s = MtaSession(node.milter.socket_path)
        s.connect()
        sessions.append(s)
    try:
        s = wait_for(node.url, lambda s: total(s, "mailwarden_milter_sessions") >= 3)
        assert total(s, "mailwarden_milter_sessions") == 3
    finally:
        for session in sessions:
            session.close()
    s = wait_for(node.url, lambda s: total(s, "mailwarden_milter_sessions") == 0)
    assert total(s, "mailwarden_milter_sessions") == 0


def test_top_shows_the_node_at_once(node: Node) -> None:
    import subprocess
    import sys

    top = subprocess.Popen([sys.executable, "-c", "from mailwarden.cli import main; main()",
                            "--config", str(node.milter.config_path), "top", "--once", "--interval", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = 0
    try:
        while top.poll() is None:  # mail flows until top has printed
            node.send(make_message(body=f"during top {sent}\n").as_bytes(), "taro@example.jp")
            sent += 1
            time.sleep(0.05)
        out, err = top.communicate(timeout=30)
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
    assert top.returncode == 0, err
    assert node.url in out
    rates = re.findall(r"^ +(\d+\.\d)/s +\d+  verdict=accept$", out, re.MULTILINE)
    assert rates and float(rates[0]) > 0, out
    assert re.search(r"/s mean +\d+\.\d\d  p95 +\d+\.\d\d  backend=clamd", out), out
    assert "hit ratio" in out


def test_scrape_is_plain_prometheus_text(node: Node) -> None:
    samples = scrape(node.url)
    assert ("mailwarden_milter_messages_total", (("verdict", "accept"),)) in samples
