"""The policy daemon's /metrics: a real ``mailwarden policyd run`` with two workers, scraped over HTTP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.dnsstub import StubDns
from harness.ports import free_port
from harness.scrape import total, wait_for
from harness.slapd import SlapdServer
from tests.policyd.conftest import PolicyClient
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
        (directory,) = tmp_path.glob("mailwarden-policyd-metrics-*")
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
