"""The running daemon over its sockets, with real slapd, real redis-server and SQLite."""

from __future__ import annotations

import dataclasses
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import policyd.server
from harness.dnsstub import StubDns
from harness.fakes import FakeDirectory
from harness.redisserver import RedisServer
from harness.slapd import SlapdServer
from mailwarden.ldapdir import LdapDirectory
from mailwarden.store import StoreCall
from policyd.app import Decision, PolicyApp, build_services
from policyd.config import PolicydConfig
from policyd.protocol import PolicyRequest, format_request
from policyd.server import MALFORMED_ACTION, TIMEOUT_ACTION, _careful_line, decision_line
from tests.policyd.conftest import LogLines, RunningServer, client, daemon_config, request

OUT = "friend@remote.example"


# ---------------------------------------------------------------- decisions over the socket


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_sample_directory_decisions_over_unix_and_tcp(
    start_daemon: Callable[..., RunningServer], redis_server: RedisServer, backend: str
) -> None:
    server = start_daemon('checks = ["relay", "sender_login", "rate_limit"]',
                          redis=redis_server if backend == "redis" else None)
    for which in (0, 1):
        c = client(server, which)
        assert c.ask(recipient=OUT) == f"554 5.7.1 <{OUT}>: Relay access denied"
        alias = "taro.yamada@example.ne.jp"
        assert c.ask(recipient=OUT, sasl_username="taro@example.jp", sender=alias) == "OK"
        assert c.ask(recipient=OUT, sasl_username="taro@example.jp", sender="hanako@example.jp").startswith(
            "553 5.7.1 <hanako@example.jp>: Sender address not owned")
        disabled = c.ask(recipient=OUT, sasl_username="jiro@example.jp", sender="jiro@example.jp")
        assert disabled.startswith("554")
        # pbs@ has POP-before-SMTP only: no SMTP AUTH
        assert c.ask(recipient=OUT, sasl_username="pbs@example.jp", sender="pbs@example.jp").startswith("554")
        assert c.ask(recipient="hanako@example.jp") == "DUNNO"
        c.close()
    server.app.services.pbs.open("198.51.100.7", "pbs@example.jp", 600)
    c = client(server)
    assert c.ask(recipient=OUT, client_address="198.51.100.7", sender="pbs@example.jp") == "OK"
    server.app.services.pbs.open("198.51.100.8", "nobody@bare.example.net", 600)
    assert c.ask(recipient=OUT, client_address="198.51.100.8").startswith("554")


def test_rate_limit_counts_in_the_shared_redis_across_two_nodes(
    start_daemon: Callable[..., RunningServer], redis_server: RedisServer, slapd: SlapdServer,
    tmp_path: Path, empty_dns: StubDns,
) -> None:
    extra = 'checks = ["relay", "rate_limit"]\n[policyd.rate_limit.sender_domain]\nmessages = 3\n'
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
    cfg_a = daemon_config(slapd, tmp_path / "a", empty_dns.port, extra, redis=redis_server)
    cfg_b = dataclasses.replace(
        daemon_config(slapd, tmp_path / "b", empty_dns.port, extra, redis=redis_server), store=cfg_a.store
    )
    nodes = [start_daemon(app=PolicyApp(cfg_a)), start_daemon(app=PolicyApp(cfg_b))]
    answers = []
    for i in range(4):
        c = client(nodes[i % 2])
        who = {"sasl_username": "taro@example.jp", "sender": "taro@example.jp", "instance": f"m{i}"}
        answers.append(c.ask(recipient=OUT, **who))
        answers.append(c.ask(protocol_state="END-OF-MESSAGE", recipient="", recipient_count="1", **who))
        c.close()
    assert answers[:6] == ["OK", "DUNNO"] * 3
    assert answers[6].startswith("450 4.7.1 Rate limit reached: 3 messages per 3600 s for domain example.jp")


def test_store_reads_of_many_connections_are_pipelined_on_the_event_loop(
    start_daemon: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    server = start_daemon('checks = ["relay", "rate_limit"]', redis=redis_server)
    store = server.app.services.store
    loop_thread = server.thread.ident
    batches: list[int] = []
    alone: list[str] = []
    real_call_many, real_get_many = store.call_many, store.get_many

    def call_many(calls: Sequence[StoreCall]) -> list[object]:
        batches.append(len(calls))
        return real_call_many(calls)

    def get_many(keys: Sequence[str]) -> list[str | None]:
        if threading.get_ident() == loop_thread:
            alone.append(keys[0])
        return real_get_many(keys)

    store.call_many = call_many  # type: ignore[method-assign]
    store.get_many = get_many  # type: ignore[method-assign]
    who = {"recipient": OUT, "sasl_username": "taro@example.jp", "sender": "taro@example.jp"}
    clients = [client(server) for _ in range(8)]
    for c in clients:  # the policy cache, filled on the thread pool
        assert c.ask(**who) == "OK"
    batches.clear()
    for attempt in range(20):
        for n, c in enumerate(clients):
            c.send_raw(format_request(request(instance=f"{attempt}-{n}", **who)))
        assert [c.read_action() for c in clients] == ["OK"] * 8
        if max(batches) > 1:
            break
    assert alone == [], "the event loop waited for Redis alone"
    assert sum(batches) == 8 * (attempt + 1), "one store read per request"
    assert max(batches) > 1, "reads of several connections in one round trip"
    for c in clients:
        c.close()


def test_cold_lookups_go_to_the_thread_pool_and_answer_the_same(
    start_daemon: Callable[..., RunningServer],
) -> None:
    server = start_daemon('checks = ["relay", "sender_login"]')
    resolver = server.app.services.resolver
    c = client(server)
    misses = resolver.misses
    assert c.ask(recipient=OUT, sasl_username="carol@example.com", sender="carol@example.com") == "OK"
    assert resolver.misses > misses  # the first answer needed LDAP (a worker thread)
    hits = resolver.hits
    assert c.ask(recipient=OUT, sasl_username="carol@example.com", sender="carol@example.com") == "OK"
    assert resolver.hits > hits


def test_many_concurrent_connections_each_get_their_own_answers_in_order(
    start_daemon: Callable[..., RunningServer],
) -> None:
    server = start_daemon('checks = ["relay", "sender_login"]')
    users = ["taro@example.jp", "carol@example.com", "alice@example.com", "hanako@example.jp"]
    errors: list[str] = []

    def run(n: int) -> None:
        c = client(server, n % 2)
        try:
            for i in range(20):
                user = users[(n + i) % len(users)]
                good = c.ask(recipient=OUT, sasl_username=user, sender=user, instance=f"{n}-{i}")
                bad = c.ask(recipient=OUT, sasl_username=user, sender="jiro@example.jp", instance=f"{n}-{i}")
                want = f"553 5.7.1 <jiro@example.jp>: Sender address not owned by user {user}"
                if good != "OK" or bad != want:
                    errors.append(f"{user}: {good} / {bad}")
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_deadline_answers_in_time_and_other_connections_are_not_held_up(
    start_daemon: Callable[..., RunningServer], slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns,
    daemon_log: LogLines,
) -> None:
    class SlowDirectory(FakeDirectory):
        def find_domain(self, domain: str):  # type: ignore[no-untyped-def]
            if domain == "slow.example":
                time.sleep(2.5)
            return LdapDirectory(cfg.ldap).find_domain(domain)

        def find_user(self, address: str, domain):  # type: ignore[no-untyped-def]
            return LdapDirectory(cfg.ldap).find_user(address, domain)

    cfg = daemon_config(slapd, tmp_path, empty_dns.port, 'checks = ["relay"]\nrequest_timeout = 1.0\n')
    server = start_daemon(app=PolicyApp(cfg, build_services(cfg, directory=SlowDirectory())))
    fast = client(server)
    assert fast.ask(recipient="taro@example.jp") == "DUNNO"  # warms the cache
    slow = client(server)
    t0 = time.monotonic()
    slow.send_raw(format_request(request(recipient="x@slow.example")))
    assert fast.ask(recipient="taro@example.jp") == "DUNNO"
    assert time.monotonic() - t0 < 0.8  # answered inline while the slow one waits
    assert slow.read_action() == TIMEOUT_ACTION
    assert 0.95 < time.monotonic() - t0 < 2.4
    daemon_log.wait_for("check=deadline")


# ---------------------------------------------------------------- DNS on the event loop

SPF_ZONE = {
    "strict.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']},
    "chain.example": {"TXT": ['"v=spf1 include:inc.example -all"']},
    "inc.example": {"TXT": ['"v=spf1 ip4:198.51.100.0/24 -all"']},
    "explained.example": {"TXT": ['"v=spf1 -all exp=why.explained.example"']},
    "why.explained.example": {"TXT": ['"%{i} may not send for %{d}"']},
    "9.2.0.192.bl.example": {"A": ["127.0.0.2"]},
}


@pytest.fixture(scope="module")
def spf_dns() -> Iterator[StubDns]:
    with StubDns(SPF_ZONE, silent=["silent.example"]) as dns:
        yield dns


def test_spf_and_dnsbl_over_the_socket_resolve_on_the_event_loop(
    slapd: SlapdServer, tmp_path: Path, spf_dns: StubDns, start_daemon: Callable[..., RunningServer],
) -> None:
    cfg = daemon_config(slapd, tmp_path, spf_dns.port,
                        'checks = ["reputation", "spf"]\nthreads = 1\n'
                        '[policyd.reputation]\ndnsbl_zones = ["bl.example"]\n')
    server = start_daemon(app=PolicyApp(cfg))
    c = client(server)
    c.ask(recipient="taro@example.jp", client_address="192.0.2.1")  # warms the policy cache
    assert c.ask(sender="a@chain.example", client_address="198.51.100.5", instance="1").startswith(
        "PREPEND Received-SPF: Pass")  # two DNS rounds: chain.example, then inc.example
    explained = c.ask(sender="a@explained.example", client_address="192.0.2.7", instance="2")
    assert explained == "550 5.7.23 SPF fail: 192.0.2.7 may not send for explained.example"
    assert c.ask(sender="a@strict.example", client_address="192.0.2.9", instance="3") == (
        "554 5.7.1 Service unavailable; Client host [192.0.2.9] blocked using bl.example")
    # One request waiting on a DNS server that never answers holds no thread (threads = 1):
    slow = client(server, 1)
    slow.send_raw(format_request(request(sender="a@silent.example", client_address="192.0.2.20",
                                         instance="slow")))
    time.sleep(0.1)
    t0 = time.monotonic()
    for i in range(5):
        answer = c.ask(sender="a@strict.example", client_address="192.0.2.30", instance=f"q{i}")
        assert answer.startswith("PREPEND Received-SPF: Pass")
    assert time.monotonic() - t0 < 0.5
    assert slow.read_action() == "451 4.4.3 SPF temporary error, try again later"


# ---------------------------------------------------------------- bad input


def test_malformed_requests_get_a_defined_answer_and_the_connection_goes_on(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    server = start_daemon('checks = ["relay"]\nmax_line_length = 200\n')
    c = client(server)
    c.send_raw(b"request=smtpd_access_policy\nprotocol_state=RCPT\nhelo_name=\xff\xfe\n\n")
    assert c.read_action() == MALFORMED_ACTION
    c.send_raw(format_request(request(helo_name="h" * 500)))
    assert c.read_action() == MALFORMED_ACTION
    c.send_raw(b"GET / HTTP/1.0\n\n")
    assert c.read_action() == MALFORMED_ACTION
    c.send_raw(format_request(request(request="junk_policy")))
    assert c.read_action() == MALFORMED_ACTION
    assert c.ask(recipient=OUT, unknown_new_attribute="1") == f"554 5.7.1 <{OUT}>: Relay access denied"
    daemon_log.wait_for("not UTF-8")
    daemon_log.wait_for("longer than 200 bytes")
    daemon_log.wait_for("unsupported request type 'junk_policy'")


def test_client_disconnecting_mid_request_is_logged_and_harmless(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    server = start_daemon('checks = ["relay"]')
    other = client(server)
    c = client(server, 1)
    c.send_raw(format_request(request())[:-20])
    c.close()
    daemon_log.wait_for("disconnected in the middle of a request")
    assert other.ask(recipient=OUT).startswith("554")


def test_request_that_never_ends_is_cut_off(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    server = start_daemon('checks = ["relay"]\nmax_request_size = 1000\nmax_line_length = 100\n')
    c = client(server)
    with pytest.raises(OSError):
        for _ in range(2000):
            c.send_raw(b"x=" + b"y" * 97 + b"\n")
    daemon_log.wait_for("never ended")
    assert client(server).ask(recipient=OUT).startswith("554")


def test_thousands_of_idle_connections_do_not_slow_an_active_one(
    start_daemon: Callable[..., RunningServer],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 6000), hard), hard))
    server = start_daemon('checks = ["relay"]\nmax_connections = 2100\n')
    idle = []
    port = int(PolicydConfig.of(server.app.config).listen[1].rsplit(":", 1)[1])
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        c = client(server)
        c.ask(recipient=OUT)
        t0 = time.perf_counter()
        for _ in range(50):
            assert c.ask(recipient=OUT).startswith("554")
        assert (time.perf_counter() - t0) / 50 < 0.02
        assert len(server.server.connections) >= 2000
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_over_the_limit_are_refused_and_idle_ones_closed(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    server = start_daemon('checks = ["relay"]\nmax_connections = 3\nidle_timeout = 0.3\n')
    held = [client(server) for _ in range(3)]
    for c in held:
        assert c.ask(recipient=OUT).startswith("554")
    extra = client(server)
    assert extra.closed_by_peer()
    daemon_log.wait_for("max_connections (3) reached")
    assert all(c.closed_by_peer() for c in held)  # idle for longer than 0.3 s
    assert client(server).ask(recipient=OUT).startswith("554")


def test_request_without_its_blank_line_is_closed_when_idle(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    server = start_daemon('checks = ["relay"]\nidle_timeout = 0.3\n')
    c = client(server)
    c.send_raw(format_request(request())[:-1])  # no terminating blank line
    daemon_log.wait_for("1 in the middle of a request (no terminating blank line)")
    assert c.closed_by_peer()
    assert client(server).ask(recipient=OUT).startswith("554")


# ---------------------------------------------------------------- backends down


def test_ldap_down_is_a_temporary_failure_not_a_relay(
    slapd_rw: SlapdServer, tmp_path: Path, empty_dns: StubDns, start_daemon: Callable[..., RunningServer],
) -> None:
    cfg = daemon_config(slapd_rw, tmp_path, empty_dns.port, 'checks = ["relay", "sender_login"]')
    server = start_daemon(app=PolicyApp(cfg))
    c = client(server)
    assert c.ask(recipient=OUT, sasl_username="alice@example.com", sender="alice@example.com") == "OK"
    slapd_rw.stop()
    answer = c.ask(recipient=OUT, sasl_username="bob@example.com", sender="bob@example.com")
    assert answer == "451 4.3.0 Temporary lookup failure, try again later"
    assert c.ask(recipient=OUT).startswith(("451", "554"))


def test_redis_down_tempfails_pop_before_smtp_and_recovers(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines,
) -> None:
    with RedisServer() as redis:
        server = start_daemon('checks = ["relay", "rate_limit"]', redis=redis)
        server.app.services.pbs.open("198.51.100.7", "pbs@example.jp", 600)
        c = client(server)
        assert c.ask(recipient=OUT, client_address="198.51.100.7", sender="pbs@example.jp") == "OK"
        redis.stop()
        c2 = client(server)
        assert c2.ask(recipient=OUT, client_address="198.51.100.7", sender="pbs@example.jp",
                      instance="x") == "451 4.3.0 Temporary lookup failure, try again later"
        daemon_log.wait_for("queue_id=NOQUEUE instance=x check relay: backend failure (StoreUnavailable")
        # a login's relay does not need the store; its rate limit (optional) passes
        assert c2.ask(recipient=OUT, sasl_username="taro@example.jp", sender="taro@example.jp",
                      instance="y") == "OK"
        redis.restart()
        time.sleep(1.1)  # the store guard retries after its hold-down
        server.app.services.pbs.open("198.51.100.7", "pbs@example.jp", 600)
        assert c2.ask(recipient=OUT, client_address="198.51.100.7", sender="pbs@example.jp",
                      instance="z") == "OK"


@pytest.mark.parametrize("attrs", [
    {},
    {"queue_id": "", "client_name": "", "sasl_username": "taro@example.jp"},
    {"sender": "x" * 250 + "@example.jp"},
    {"recipient": "a\x1bb@example.jp", "client_name": "caf\u00e9 host"},
    {"sender": 'quote"d@example.jp', "protocol_state": "END-OF-MESSAGE"},
])
@pytest.mark.parametrize("decision", [
    Decision("OK", "relay", "relay for SMTP-AUTH login taro@example.jp"),
    Decision("DUNNO", "", ""),
    Decision("554 5.7.1 <a@b>: Relay access denied", "relay", 'third-party "relay" refused'),
])
def test_decision_line_fast_path_matches_the_careful_one(attrs: dict[str, str], decision: Decision) -> None:
    req = PolicyRequest(request(**attrs))
    assert decision_line(req, decision, 1.234) == _careful_line(req, decision, 1.234)


def test_decision_line_is_built_only_when_info_is_logged(
    start_daemon: Callable[..., RunningServer], daemon_log: LogLines, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []

    def counted(request: PolicyRequest, decision: Decision, ms: float) -> str:
        built.append(decision.action)
        return decision_line(request, decision, ms)

    async def level(value: int) -> None:
        # On the event loop: after the answer before it is completely done, line and all.
        logging.getLogger("mailwarden.policyd").setLevel(value)

    monkeypatch.setattr(policyd.server, "decision_line", counted)
    server = start_daemon('checks = ["relay"]')
    c = client(server)
    server.call(level(logging.WARNING))
    assert c.ask(recipient=OUT).startswith("554")
    server.call(level(logging.INFO))
    assert built == []
    assert not any("action=" in line for line in daemon_log.lines)
    assert c.ask(recipient=OUT).startswith("554")
    server.call(level(logging.INFO))
    assert built == ["554 5.7.1 <friend@remote.example>: Relay access denied"]
    daemon_log.wait_for('action="554 5.7.1')
    c.close()


def test_the_benchmark_load_generator_gets_an_answer_for_every_request(
    start_daemon: Callable[..., RunningServer],
) -> None:
    from bench.bench_policyd import load

    server = start_daemon('checks = ["relay"]')
    requests = [format_request(request(recipient=OUT, instance=f"g{i}")) for i in range(200)]
    for spec in PolicydConfig.of(server.app.config).listen:
        for pinned in (False, True):
            result = load(spec, requests, 4, pinned=pinned)
            assert result["requests"] == 200
            assert result["actions"] == {"554": 200}
            assert 0 < result["p50_ms"] <= result["p99_ms"]
