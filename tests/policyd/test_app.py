"""Configuration checks, the store guard and the batched decision log."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from mailwarden.config import parse_config
from mailwarden.linelog import DecisionLog
from mailwarden.store import MemoryStore, StoreCall, StoreUnavailable
from policyd.app import GuardedStore, parse_listen, validate
from policyd.config import PolicydConfig
from tests.policyd.conftest import Clock


def test_listen_specs() -> None:
    assert parse_listen("unix:/run/p.sock") == ("unix", "/run/p.sock", 0)
    assert parse_listen("inet:127.0.0.1:10031") == ("inet", "127.0.0.1", 10031)
    assert parse_listen("inet:[::1]:10031") == ("inet", "::1", 10031)
    for bad in ("tcp:1", "unix:relative.sock", "inet:host", "inet:host:99999", "nothing"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_every_bad_policyd_key_is_named() -> None:
    cfg = parse_config("""
[policyd]
listen = ["unix:relative"]
login_report_listen = ["unix:/run/x.sock"]
socket_mode = "rw"
workers = 0
request_timeout = 120.0
trusted_networks = ["10.0.0.0/33"]
checks = ["relay", "telepathy"]
login_report_header = "no colon"
login_domain = "bad domain"
[policyd.spf]
actions = { fail = "explode", temperror = "reject" }
[policyd.spf.domains."example.jp"]
sideways = "reject"
[policyd.reputation]
weights = { phishing = 3.0 }
half_life = 0.0
[policyd.greylist]
ipv4_prefix = 40
[policyd.rate_limit.client]
window = 0
messages = -1
""")
    problems = "\n".join(validate(PolicydConfig.of(cfg)))
    for key in ("policyd.listen[0]", "policyd.login_report_listen[0]", "policyd.socket_mode",
                "policyd.workers", "policyd.request_timeout", "policyd.trusted_networks[0]",
                "policyd.checks[1]: unknown check 'telepathy'", "policyd.login_report_header",
                "policyd.login_domain", "policyd.spf.actions.fail: 'explode'",
                "policyd.spf.actions.temperror", 'policyd.spf.domains."example.jp".sideways',
                "policyd.reputation.weights.phishing", "policyd.reputation.half_life",
                "policyd.greylist.ipv4_prefix", "policyd.rate_limit.client.window",
                "policyd.rate_limit.client.messages"):
        assert key in problems, key
    assert validate(PolicydConfig.of(parse_config(""))) == []


def test_store_guard_fails_fast_while_the_backend_is_down() -> None:
    clock = Clock(0.0)
    calls = []

    class Flaky(MemoryStore):
        down = True

        def get(self, key: str) -> str | None:
            calls.append(key)
            if self.down:
                raise StoreUnavailable("redis store: Connection refused")
            return super().get(key)

    backend = Flaky()
    guard = GuardedStore(backend, hold_down=1.0, clock=clock)
    with pytest.raises(StoreUnavailable):
        guard.get("a")
    with pytest.raises(StoreUnavailable, match="not retried for 1 s"):
        guard.get("b")
    assert calls == ["a"]
    backend.down = False
    clock.advance(1.01)
    assert guard.get("c") is None and calls == ["a", "c"]
    # Operations made together (the event loop's) are held down the same way.
    backend.down = True
    clock.advance(1.01)
    failed = guard.call_many([StoreCall("get", ("d",)), StoreCall("set", ("e", "v"))])
    assert isinstance(failed[0], StoreUnavailable) and failed[1] is None
    assert all(isinstance(r, StoreUnavailable) for r in guard.call_many([StoreCall("get", ("f",))]))
    assert calls == ["a", "c", "d"]
    backend.down = False
    clock.advance(1.01)
    assert guard.call_many([StoreCall("get", ("e",))]) == ["v"]


def test_decision_lines_are_formatted_by_the_handler_and_written_once_per_loop_turn() -> None:
    root = logging.getLogger("mailwarden")
    saved = (root.handlers[:], root.propagate, root.level)
    stream = io.StringIO()
    writes: list[str] = []
    real_write = stream.write

    def write(text: str) -> int:
        writes.append(text)
        return real_write(text)

    stream.write = write  # type: ignore[method-assign]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("mw: %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    try:
        decisions = DecisionLog(logging.getLogger("mailwarden.policyd"))
        decisions.start(loop)
        for i in range(3):
            decisions.info(f"queue_id=NOQUEUE line {i}")
        assert writes == []
        loop.run_until_complete(asyncio.sleep(0))
        assert writes == ["mw: INFO queue_id=NOQUEUE line 0\nmw: INFO queue_id=NOQUEUE line 1\n"
                          "mw: INFO queue_id=NOQUEUE line 2\n"]
        root.setLevel(logging.WARNING)
        decisions.info("not logged")
        loop.run_until_complete(asyncio.sleep(0))
        assert len(writes) == 1
    finally:
        loop.close()
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])


@pytest.mark.parametrize(("fmt", "fast"), [
    ("%(asctime)s mailwarden/policyd[1]: node: %(levelname)s %(message)s", True),
    ("%(name)s %(process)d %(message)s", True),
    ("%(levelname)s %(message)s [%(lineno)d]", False),
    ("%(levelname)s %(funcName)s %(message)s", False),
    ("%(thread)d %(message)s", False),
    ("%(relativeCreated)d %(message)s", False),
    ("%(message)s %(message)s", False),
    ("100%% %(levelname)s %(message)s", True),
])
def test_decision_line_prefix_is_reused_only_for_record_independent_formats(fmt: str, fast: bool) -> None:
    root = logging.getLogger("mailwarden")
    saved = (root.handlers[:], root.propagate, root.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    try:
        logger = logging.getLogger("mailwarden.policyd")
        decisions = DecisionLog(logger)
        decisions.start(loop)
        assert decisions._prefix_ok is fast
        decisions.info("queue_id=NOQUEUE action=OK")
        decisions.flush()
        expected = handler.format(logger.makeRecord(logger.name, logging.INFO, "", 0, "%s",
                                                    ("queue_id=NOQUEUE action=OK",), None))
        got = stream.getvalue()
        # the time fields may differ by a millisecond; everything after them must match
        timed = "asctime" in fmt or "relativeCreated" in fmt
        assert got.endswith(expected.split(" ", 2)[-1] + "\n") if timed else got == expected + "\n"
    finally:
        loop.close()
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
