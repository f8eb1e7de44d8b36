"""The policy daemon's /metrics: a real ``mailwarden policyd run`` with two workers, scraped over HTTP."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.dnsstub import StubDns
from harness.ports import free_port
from harness.scrape import total, wait_for
from harness.slapd import SlapdServer
from mailwarden.config import parse_config
from mailwarden.metrics import Metrics
from mailwarden.store import MemoryStore, StoreCall
from policyd.app import Engine, build_services
from policyd.checks.base import NeedStore, Transaction, WouldBlock, permit, reject
from policyd.metrics import PolicydMetrics
from policyd.protocol import PolicyRequest
from tests.policyd.conftest import PolicyClient, fake_directory, request
from tests.policyd.test_cli import MAILWARDEN, OUT, stop_daemon, wait_answering, write_config

pytestmark = pytest.mark.slapd


def test_decisions_add_up_over_both_workers(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    extra = f'workers = 2\nlogin_report_listen = []\nmetrics_listen = "127.0.0.1:{port}"\n'
    path, listen = write_config(slapd, tmp_path, empty_dns, extra)
    url = f"http://127.0.0.1:{port}/metrics"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    proc = subprocess.Popen([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_answering(listen[1], proc).close()
        # The listeners are bound before the workers start; the exporter's directory
        # comes with them.
        deadline = time.monotonic() + 15
        while not (found := list(tmp_path.glob("mailwarden-policyd-metrics-*"))):
            assert time.monotonic() < deadline and proc.poll() is None, "no metrics directory"
            time.sleep(0.05)
        (directory,) = found
        for _ in range(20):  # one connection each: both workers take some
            client = PolicyClient(listen[1])
            assert client.ask(recipient=OUT).startswith("554 5.7.1")
            taro = "taro@example.jp"
            assert client.ask(recipient=OUT, sasl_username=taro, sender=taro) == "OK"
            client.close()
        client = PolicyClient(listen[0])
        client.send_raw(b"request=smtpd_access_policy\nprotocol_state=BOGUS\n\n")
        assert client.read_action().startswith("DEFER_IF_PERMIT")
        held = PolicyClient(listen[1])

        s = wait_for(url, lambda s: total(s, "mailwarden_policyd_connections") >= 2)
        decisions = "mailwarden_policyd_decisions_total"
        assert total(s, decisions, stage="RCPT", check="relay", action="reject") == 20
        assert total(s, decisions, action="ok") == 20
        assert total(s, decisions, check="malformed", action="defer") == 1
        assert total(s, decisions) == 41
        assert total(s, "mailwarden_policyd_request_seconds_count") == 41
        # What each check answered, whether or not it decided: relay refused 20 and
        # permitted the 20 logins; sender_login was asked only for those 20.
        results = "mailwarden_policyd_check_results_total"
        assert total(s, results, check="relay", result="reject") == 20
        assert total(s, results, check="relay", result="ok") == 20
        assert total(s, results, check="sender_login") == 20
        assert total(s, "mailwarden_policyd_check_failures_total") == 0
        assert total(s, "mailwarden_policyd_connections") == 2  # the malformed one's and the held one
        assert total(s, "mailwarden_policyd_backend_seconds_count", backend="ldap") >= 1
        assert total(s, "mailwarden_policyd_cache_requests_total", cache="policy", result="hit") >= 1
        assert not any(any("@" in v or v.startswith("127.") for _, v in labels) for _, labels in s)
        # Both workers write their own file; the scrape adds them up.
        assert len(list(directory.glob("*.json"))) == 2
        client.close()
        held.close()
        s = wait_for(url, lambda s: total(s, "mailwarden_policyd_connections") == 0)
        assert total(s, "mailwarden_policyd_connections") == 0
    finally:
        err = stop_daemon(proc)
    assert proc.returncode == 0, err
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err
    assert not directory.exists(), "the multiprocess directory is removed at stop"


def test_metrics_listen_must_be_host_and_port(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns) -> None:
    path, _ = write_config(slapd, tmp_path, empty_dns,
                           'login_report_listen = []\nmetrics_listen = "metrics.example:9102"\n')
    result = subprocess.run([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 78
    assert "policyd.metrics_listen: 'metrics.example:9102': the host must be an IP address" in result.stderr


def test_a_metrics_port_in_use_stops_the_start(slapd: SlapdServer, tmp_path: Path,
                                               empty_dns: StubDns) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path, _ = write_config(slapd, tmp_path, empty_dns,
                               f'login_report_listen = []\nmetrics_listen = "127.0.0.1:{port}"\n')
        result = subprocess.run([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                                capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 71  # EX_OSERR
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_one_worker_serves_its_own_metrics(slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns) -> None:
    """With ``workers = 1`` there is no parent: the worker serves /metrics from a thread."""
    port = free_port()
    extra = f'workers = 1\nlogin_report_listen = []\nmetrics_listen = "127.0.0.1:{port}"\n'
    path, listen = write_config(slapd, tmp_path, empty_dns, extra)
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen([*MAILWARDEN, "--config", str(path), "policyd", "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        client = wait_answering(listen[0], proc)
        for _ in range(3):
            assert client.ask(recipient=OUT).startswith("554 5.7.1")
        client.close()
        s = wait_for(url, lambda s: total(s, "mailwarden_policyd_decisions_total") >= 3)
        assert total(s, "mailwarden_policyd_decisions_total", check="relay", action="reject") == 3
    finally:
        err = stop_daemon(proc)
    assert proc.returncode == 0, err


class Stub:
    """A check answering from a list; ``WouldBlock`` in it is raised."""

    stages = ("RCPT",)
    spares_role_addresses = False
    failure_action = "dunno"

    def __init__(self, name: str, answers: list[Any]) -> None:
        self.name = name
        self.answers = answers

    def evaluate(self, _ctx: Any) -> Any:
        answer = self.answers.pop(0)
        if answer is WouldBlock:
            raise WouldBlock
        return answer


def test_a_check_redone_off_the_loop_counts_once() -> None:
    """An evaluation the loop gives up (WouldBlock) and a worker thread redoes is one answer
    per check, though the first check answered twice."""
    config = parse_config(f'[dns]\nnameservers = ["127.0.0.1"]\nport = {free_port()}\n', "t.toml")
    metrics = PolicydMetrics(Metrics(directory=""))
    services = build_services(config, directory=fake_directory(), store=MemoryStore(), metrics=metrics)
    first = Stub("first", [permit("yes"), permit("yes")])
    second = Stub("second", [WouldBlock, None])
    engine = Engine([first, second], services)  # type: ignore[list-item]
    engine.count()
    req = PolicyRequest(request(recipient=OUT))
    txn = Transaction(req.instance)
    services.resolver.effective_policy(OUT)  # the recipient's policy is cached
    with pytest.raises(WouldBlock):
        engine.decide(req, txn, inline=True)
    assert engine.decide(req, txn, inline=False).action == "OK"
    assert first.answers == [] and second.answers == []
    totals = engine.check_totals()
    assert totals[("first", "OK")] == 1 and totals[("second", "DUNNO")] == 1
    assert sum(totals.values()) == 2


class StoreReader:
    """A check that reads ``k`` from the store: DUNNO when it holds ``v``."""

    name = "reader"
    stages = ("RCPT",)
    spares_role_addresses = False
    failure_action = "dunno"

    def __init__(self) -> None:
        self.runs = 0

    def evaluate(self, ctx: Any) -> Any:
        self.runs += 1
        return None if ctx.store.get("k") == "v" else reject("550 5.7.1 no", "k is not v")


def test_a_request_paused_for_the_store_goes_on_at_the_check_that_asked_and_counts_once() -> None:
    config = parse_config(f'[dns]\nnameservers = ["127.0.0.1"]\nport = {free_port()}\n', "t.toml")
    metrics = PolicydMetrics(Metrics(directory=""))
    store = MemoryStore()
    store.set("k", "v")
    services = build_services(config, directory=fake_directory(), store=store, metrics=metrics)
    first = Stub("first", [permit("yes")])  # a second run would find no answer
    reader = StoreReader()
    engine = Engine([first, reader], services)  # type: ignore[list-item]
    engine.count()
    req = PolicyRequest(request(recipient=OUT))
    services.resolver.effective_policy(OUT)  # the recipient's policy is cached
    with pytest.raises(NeedStore) as paused:
        engine.decide(req, Transaction(req.instance), inline=True)
    assert paused.value.call == StoreCall("get", ("k",))
    result = services.store.call_many([paused.value.call])[0]
    assert engine.resume(paused.value, result).action == "OK"
    assert first.answers == [] and reader.runs == 2
    totals = engine.check_totals()
    assert totals[("first", "OK")] == 1 and totals[("reader", "DUNNO")] == 1
    assert sum(totals.values()) == 2
