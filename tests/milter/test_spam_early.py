"""The spam check with rspamd sent while clamd scans (``SpamFilter.start_early``),
with the outcomes decided in the filters' order all the same."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from harness.clamd import EICAR
from mailwarden.policy import PolicyResolver
from mailwarden.store import MemoryStore
from milters import protocol
from milters.scanners import ScanError, SpamQuery, SpamResult, VirusResult
from milters.service import MilterService, build_service
from tests.milter.helpers import (
    FakeVirusScanner,
    Fed,
    RecordingInjector,
    drive,
    make_message,
    milter_config,
    sample_directory,
)

PAUSE = 0.4


class SlowVirusScanner(FakeVirusScanner):
    """clamd taking ``PAUSE`` seconds a scan."""

    async def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        await asyncio.sleep(PAUSE)
        return await super().scan(stream, deadline)


class SlowSpamScanner:
    """rspamd taking ``PAUSE`` seconds a check; notes when checks start and which were cancelled."""

    def __init__(self, error: str = "") -> None:
        self.started: list[float] = []
        self.cancelled = 0
        self.queries: list[SpamQuery | None] = []
        self.error = error

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        self.started.append(time.monotonic())
        self.queries.append(query)
        try:
            await asyncio.sleep(PAUSE)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error:
            raise ScanError(self.error)
        return SpamResult(20.0, ("BIG",), "fake")


def service(tmp_path: Path, spam: SlowSpamScanner, extra: str = "", *,
            sender_auth: bool = False) -> MilterService:
    engine = f'spam_engine = "rspamd"\nrspamd = ["unix:{tmp_path}/no-rspamd.sock"]\n'
    cfg = milter_config(tmp_path, engine + extra, sender_auth=sender_auth)
    return build_service(cfg, store=MemoryStore(), virus_scanner=SlowVirusScanner(), spam_scanner=spam,
                         injector=RecordingInjector(), resolver=PolicyResolver(sample_directory(), cfg))


def run(svc: MilterService, body: str, *recipients: str) -> tuple[Fed, float]:
    async def go() -> tuple[Fed, float]:
        started = time.monotonic()
        fed = await drive(svc, make_message(body, sender="jiro@remote.example").as_bytes(),
                          "jiro@remote.example", list(recipients), "EARLY1")
        return fed, time.monotonic() - started

    return asyncio.run(go())


def test_rspamd_scores_while_clamd_scans_and_each_recipient_gets_their_outcome(tmp_path: Path) -> None:
    """taro has spam checking (score 20 >= his reject score: refused), bob has not."""
    spam = SlowSpamScanner()
    fed, took = run(service(tmp_path, spam), "hello\n", "taro@example.jp", "bob@example.com")
    assert took < 2 * PAUSE * 0.9  # one pause, not the two in turn
    assert len(spam.started) == 1 and spam.cancelled == 0
    assert fed.rc == protocol.ACCEPT  # bob's copy goes on; taro is removed
    assert [h for h in fed.headers if h[0].lower().startswith("x-spam")] == []


def test_an_infected_message_cancels_the_early_spam_check(tmp_path: Path) -> None:
    spam = SlowSpamScanner()
    fed, _ = run(service(tmp_path, spam), EICAR.decode() + "\n", "taro@example.jp")
    assert fed.rc == protocol.REJECT and "virus" in fed.reply[2].lower()
    assert len(spam.started) == 1 and spam.cancelled == 1


def test_a_failed_early_check_applies_the_failure_action(tmp_path: Path) -> None:
    spam = SlowSpamScanner(error="rspamd: connection refused")
    fed, _ = run(service(tmp_path, spam), "hello\n", "taro@example.jp")
    assert fed.rc == protocol.TEMPFAIL and "spam check failed: rspamd" in fed.reply[2]


def test_with_sender_authentication_the_check_waits_for_its_findings(tmp_path: Path) -> None:
    """rspamd's own SPF, DKIM and DMARC are switched off only for a message mailwarden
    checked: the request is sent after sender authentication, in turn."""
    spam = SlowSpamScanner()
    run(service(tmp_path, spam, "[dns]\nnameservers = [\"127.0.0.1\"]\nport = 9\ntimeout = 0.2\n",
                sender_auth=True), "hello\n", "taro@example.jp")
    assert spam.queries[0] is not None and spam.queries[0].sender_auth_done
