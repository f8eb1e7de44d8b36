"""Helpers for the policy daemon's tests: request builders, a fake world, a running server."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.dnsstub import StubDns
from harness.fakes import FakeDirectory
from harness.ports import free_port
from harness.redisserver import RedisServer
from harness.slapd import SlapdServer
from mailwarden.config import Config, parse_config
from mailwarden.store import MemoryStore, Store, StoreCall
from policyd.app import Decision, PolicyApp, Services, build_services
from policyd.checks.base import NeedStore, Transaction
from policyd.config import PolicydConfig
from policyd.protocol import PolicyRequest, format_request
from policyd.server import PolicyServer
from tests.conftest import config_for


def request(**attrs: str) -> dict[str, str]:
    """A policy request with Postfix-like defaults (an anonymous client at RCPT)."""
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "helo_name": "mail.outside.example",
        "queue_id": "",
        "sender": "someone@outside.example",
        "recipient": "taro@example.jp",
        "recipient_count": "0",
        "client_address": "203.0.113.9",
        "client_name": "mail.outside.example",
        "instance": "1a2b.3c4d.0",
        "sasl_method": "",
        "sasl_username": "",
        "size": "0",
    }
    base.update(attrs)
    return base


def fake_directory() -> FakeDirectory:
    """A small world like ldap/sample.ldif, for unit tests."""
    d = FakeDirectory()
    d.add_domain("example.jp", domain_alias=["example.ne.jp"],
                 enabled_service=["smtp-auth", "pop-before-smtp", "rate-limits"],
                 pop_before_smtp_ttl="600", rate_limit_messages="3", rate_limit_window="60")
    d.add_user("taro@example.jp", alternate_address=["taro.yamada@example.jp"])
    d.add_user("jiro@example.jp", account_status="disabled")
    d.add_user("nosmtp@example.jp", disabled_service=["smtp-auth", "pop-before-smtp"])
    d.add_user("big@example.jp", rate_limit_messages="0", rate_limit_recipients="5",
               rate_limit_bytes="1000")
    d.add_user("free@example.jp", disabled_service=["rate-limits"])
    d.add_domain("lab.example.org", enabled_service=["greylisting"], greylist_delay="300")
    d.add_user("prof@lab.example.org", disabled_service=["greylisting"])
    d.add_user("student@lab.example.org")
    d.add_user("quick@lab.example.org", greylist_delay="60")
    d.add_domain("example.com", enabled_service=["smtp-auth"], allowed_senders=["@partner.example"])
    d.add_user("alice@example.com")
    return d


class Clock:
    """A settable clock for stores, greylisting and reputation."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class World:
    """Engine and services over fakes; ``decide(**attrs)`` answers one request."""

    config: Config
    directory: FakeDirectory
    store: Store
    clock: Clock
    app: PolicyApp
    services: Services
    txns: dict[str, Transaction] = field(default_factory=dict)
    counter: int = 0

    def decide(self, **attrs: str) -> Decision:
        """Evaluate like a worker thread would (lookups allowed).

        Each call is its own mail transaction unless ``instance`` is given.
        """
        if "instance" not in attrs:
            self.counter += 1
            attrs["instance"] = f"t{self.counter}"
        req = PolicyRequest(request(**attrs))
        txn = self.txns.setdefault(req.instance, Transaction(req.instance))
        return self.app.engine.decide(req, txn, inline=False)

    def action(self, **attrs: str) -> str:
        """Only the action."""
        return self.decide(**attrs).action

    def on_the_loop(self, **attrs: str) -> tuple[str, list[StoreCall]]:
        """Evaluate as the event loop does (the store never called directly; each pause for
        it resumed): the action and the store operations made, in order."""
        req = PolicyRequest(request(**attrs))
        txn = self.txns.setdefault(req.instance, Transaction(req.instance))
        made: list[StoreCall] = []
        try:
            return self.app.engine.decide(req, txn, inline=True).action, made
        except NeedStore as need:
            paused = need
        while True:
            made.append(paused.call)
            try:
                result = self.services.store.call_many([paused.call])[0]
                return self.app.engine.resume(paused, result).action, made
            except NeedStore as again:
                paused = again


def make_world(extra: str = "", *, dns_port: int | None = None, store: Store | None = None,
               directory: FakeDirectory | None = None) -> World:
    """A World with ``extra`` TOML added to a test configuration."""
    clock = Clock()
    dns_part = f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port or free_port()}\n' \
               "timeout = 0.5\nlifetime = 1.0\n"
    config = parse_config(dns_part + extra, "test.toml")
    directory = directory if directory is not None else fake_directory()
    store = store if store is not None else MemoryStore(clock=clock)
    services = build_services(config, directory=directory, store=store, clock=clock)
    app = PolicyApp(config, services)
    return World(config, directory, store, clock, app, services)


@pytest.fixture(scope="session")
def empty_dns() -> Iterator[StubDns]:
    """A stub DNS server that knows nothing (every name is NXDOMAIN)."""
    with StubDns() as dns:
        yield dns


@pytest.fixture
def world(empty_dns: StubDns) -> World:
    """The default configuration over the fake directory."""
    return make_world(dns_port=empty_dns.port)


@pytest.fixture
def world_with(empty_dns: StubDns) -> Callable[..., World]:
    """Build a World with extra configuration (DNS: the empty stub unless dns_port is given)."""

    def make(extra: str = "", **kwargs: Any) -> World:
        kwargs.setdefault("dns_port", empty_dns.port)
        return make_world(extra, **kwargs)

    return make


# ---------------------------------------------------------------- a running daemon


class RunningServer:
    """A PolicyServer on its own event loop in a background thread."""

    def __init__(self, app: PolicyApp) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.server = PolicyServer(app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> RunningServer:
        self.thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=30)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class PolicyClient:
    """A blocking client speaking the policy protocol like Postfix's smtpd."""

    def __init__(self, spec: str, timeout: float = 15.0) -> None:
        kind, _, where = spec.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_action(self) -> str:
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the daemon")
            self.buf += chunk
        block, _, self.buf = self.buf.partition(b"\n\n")
        assert block.startswith(b"action="), block
        return block[7:].decode()

    def ask(self, **attrs: str) -> str:
        self.send_raw(format_request(request(**attrs)))
        return self.read_action()

    def closed_by_peer(self, within: float = 5.0) -> bool:
        """Whether the daemon closes the connection within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def unix_and_tcp(tmp: Any) -> tuple[str, str]:
    """Listen specs for a temp unix socket and a free TCP port."""
    return f"unix:{tmp}/policy.sock", f"inet:127.0.0.1:{free_port()}"


# ---------------------------------------------------------------- daemon fixtures


class LogLines(logging.Handler):
    """Collects the daemon's log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            time.sleep(0.01)
        raise AssertionError(f"no log line with {text!r} in {self.lines[-10:]}")


@pytest.fixture
def daemon_log() -> Iterator[LogLines]:
    logger = logging.getLogger("mailwarden.policyd")
    handler = LogLines()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def daemon_config(slapd: SlapdServer, tmp: Path, dns_port: int, extra: str = "",
                  *, redis: RedisServer | None = None, login_port: int | None = None) -> Config:
    """A configuration for a daemon on a temp unix socket and a free TCP port."""
    unix, tcp = unix_and_tcp(tmp)
    login = f'"inet:127.0.0.1:{login_port}"' if login_port else ""
    store = (f'[store]\nbackend = "redis"\nredis_url = "{redis.url}"\nkey_prefix = "{uuid.uuid4().hex}:"\n'
             if redis else f'[store]\nsqlite_path = "{tmp}/state.sqlite3"\n')
    text = (f'{store}[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = 0.5\nlifetime = 1.0\n'
            f'[policyd]\nlisten = ["{unix}", "{tcp}"]\nlogin_report_listen = [{login}]\n{extra}')
    return config_for(slapd, text)


@pytest.fixture
def start_daemon(
    slapd: SlapdServer, tmp_path: Path, empty_dns: StubDns
) -> Iterator[Callable[..., RunningServer]]:
    """Start in-process daemons (stopped after the test)."""
    running: list[RunningServer] = []

    def start(extra: str = "", *, redis: RedisServer | None = None, app: PolicyApp | None = None,
              login_port: int | None = None) -> RunningServer:
        if app is None:
            app = PolicyApp(daemon_config(slapd, tmp_path, empty_dns.port, extra, redis=redis,
                                          login_port=login_port))
        server = RunningServer(app).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def client(server: RunningServer, which: int = 0) -> PolicyClient:
    """A client on the server's first (unix) or second (TCP) listener."""
    return PolicyClient(PolicydConfig.of(server.app.config).listen[which])


