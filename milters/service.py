"""Wiring: the configured resolver, store, scanners, filters and delivery, shared by
every milter connection, and the one place a finished message is decided and logged.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailwarden.config import Config
from mailwarden.directory import Directory
from mailwarden.linelog import DecisionLog
from mailwarden.notify import NoticeTemplates, Notifier
from mailwarden.policy import PolicyResolver
from mailwarden.reputation import Reputation
from mailwarden.store import Store, open_store
from milters.delivery import Delivery, MilterActions, Outcome
from milters.filters import Envelope, Filter
from milters.filters.extensions import ExtensionFilter
from milters.filters.keywords import KeywordFilter
from milters.filters.spam import SpamFilter
from milters.filters.virus import LocalScanCache, ScanCache, StoreScanCache, VirusFilter
from milters.message import BodySpool, HeaderList, Limits, Message, ensure_dir
from milters.pipeline import Pipeline
from milters.quarantine import Quarantine
from milters.reinject import Injector, SmtpInjector
from milters.scanners import SpamScanner, VirusScanner
from milters.scanners.clamd import ClamdScanner
from milters.scanners.spamd import SpamdScanner
from milters.verdict import Action, Disposition, Recipient, Verdict

log = logging.getLogger("mailwarden.milter")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class MilterService:
    """Everything a milter connection needs, built once per process."""

    config: Config
    resolver: PolicyResolver
    pipeline: Pipeline
    delivery: Delivery
    limits: Limits
    reputation: Reputation | None = None
    lines: DecisionLog = field(default_factory=lambda: DecisionLog(log))
    """The one-line-per-message log (batched on the asyncio server's loop)."""

    def new_spool(self) -> BodySpool:
        """A body spool with the configured memory limit."""
        return BodySpool(self.limits.memory_limit, self.limits.spool_dir)

    def process(self, envelope: Envelope, headers: HeaderList, spool: BodySpool,
                recipients: Sequence[Recipient], actions: MilterActions) -> Outcome:
        """Decide and carry out one message; log one line; never raises for bad input."""
        decided = self.decide(envelope, Message(headers, spool, self.limits), recipients)
        outcome = self.finish(decided, actions)
        kind = self.reputation_kind(decided, outcome)
        if kind is not None:
            self.record(decided.envelope.client_address, kind)
        return outcome

    def deadline(self, started: float) -> float:
        """When the end-of-message work started at ``started`` must be done."""
        return started + self.config.milter.eom_budget

    def decide(self, envelope: Envelope, message: Message, recipients: Sequence[Recipient]) -> Decided:
        """Run the filters: every recipient's outcome, nothing carried out yet."""
        started = time.monotonic()
        deadline = self.deadline(started)
        verdict = self.pipeline.run(envelope, message, recipients, deadline)
        return Decided(envelope, message, verdict, started, deadline)

    async def decide_on_loop(self, envelope: Envelope, message: Message, recipients: Sequence[Recipient],
                             started: float) -> Decided:
        """:meth:`decide` on the running event loop (after :meth:`loop_filter_ready`)."""
        deadline = self.deadline(started)
        verdict = await self.pipeline.run_on_loop(envelope, message, recipients, deadline)
        verdict.findings["decided"] = "loop"
        return Decided(envelope, message, verdict, started, deadline)

    def finish(self, decided: Decided, actions: MilterActions) -> Outcome:
        """Carry out a decided message and log its line."""
        outcome = self.delivery.carry_out(decided.verdict, decided.message, decided.envelope, actions,
                                          deadline=decided.deadline)
        self._log(decided.envelope, decided.message, decided.verdict, outcome, decided.started)
        return outcome

    # ------------------------------------------------------------ on an event loop

    def loop_filter_ready(self, recipients: Sequence[Recipient], size: int) -> bool:
        """Whether the filters can decide this message on an event loop.

        True when the message is small (``milter.loop_max_size``: its parse and archive
        listing take well under a millisecond) and every filter that some recipient has
        can fetch what it waits for as non-blocking I/O (clamd, spamd; not a scan cache
        in the shared store): :meth:`decide_on_loop`.
        """
        if size > self.config.milter.loop_max_size:
            return False
        return not any(flt.waits and _wanted(flt, recipients) for flt in self.pipeline.filters)

    def finish_waits(self, decided: Decided) -> bool:
        """Whether carrying out waits on something (quarantine, re-injection; notices go
        to the outbox and wait for nothing)."""
        verdict = decided.verdict
        if verdict.disposition is Disposition.TEMPFAIL:
            return False
        return (any(o.action is Action.QUARANTINE for o in verdict.outcomes)
                or (verdict.disposition is Disposition.ACCEPT and len(verdict.groups()) > 1))

    def close(self) -> None:
        """Before the process ends: send the notices still waiting."""
        self.delivery.close(self.config.milter.reinject_timeout)

    def _log(self, envelope: Envelope, message: Message, verdict: Verdict, outcome: Outcome,
             started: float) -> None:
        parts = [
            f"{envelope.queue_id or 'NOQUEUE'}: {outcome.disposition.value}",
            f"from=<{envelope.sender}>",
            f"client={envelope.client_address or '-'}",
            f"size={message.size}",
            f"nrcpt={len(verdict.outcomes)}",
            *(o.summary() for o in verdict.outcomes),
            *(f"{k}={v}" for k, v in verdict.findings.items()),
        ]
        if outcome.variants > 1:
            parts.append(f"variants={outcome.variants} reinjected={','.join(outcome.reinjected)}")
        if outcome.quarantine_id:
            parts.append(f"quarantine={outcome.quarantine_id}")
        if outcome.notices:
            parts.append("notices=" + ",".join(outcome.notices))
        if outcome.reply:
            parts.append(f'reply="{outcome.reply}"')
        parts.append(f"ms={(time.monotonic() - started) * 1000:.1f}")
        # File names and header text come from the sender: no line breaks into the log.
        self.lines.info(_CONTROL.sub("?", " ".join(parts)))

    def reputation_kind(self, decided: Decided, outcome: Outcome) -> str | None:
        """What this message says about its client (virus, spam, rejected, clean), or None
        when nothing is recorded (no reputation, a local client, a deferred message)."""
        address = decided.envelope.client_address
        if self.reputation is None or not address:
            return None
        try:
            if address.startswith("127.") or address == "::1" or ipaddress.ip_address(address).is_loopback:
                return None  # local submissions and tests say nothing about a client's reputation
        except ValueError:
            return None
        findings = decided.verdict.findings
        if findings.get("virus", "").startswith("FOUND"):
            return "virus"
        if findings.get("spam", "").endswith("(spam)"):
            return "spam"
        if outcome.disposition is Disposition.REJECT:
            return "rejected"
        if outcome.disposition is Disposition.ACCEPT:
            return "clean"
        return None

    def record(self, address: str, kind: str) -> None:
        """Feed the client's reputation with a :meth:`reputation_kind` (a store write)."""
        if self.reputation is None:
            return
        try:
            self.reputation.record(address, kind)
        except Exception as exc:  # noqa: BLE001 (reputation is advisory; mail goes on)
            log.warning("reputation not recorded for %s: %s", address, exc)


def _wanted(flt: Filter, recipients: Sequence[Recipient]) -> bool:
    """Whether some recipient has ``flt``'s service."""
    return any(r.policy.enabled(flt.service) for r in recipients)


@dataclass
class Decided:
    """A message the filters have decided, before it is carried out."""

    envelope: Envelope
    message: Message
    verdict: Verdict
    started: float
    deadline: float


def limits_from(config: Config) -> Limits:
    """The parse and archive limits from ``[milter]``."""
    m = config.milter
    return Limits(max_parts=m.max_parts, max_depth=min(m.max_depth, 100),
                  archive_max_depth=m.archive_max_depth, archive_max_members=m.archive_max_members,
                  archive_max_size=m.archive_max_size, archive_max_ratio=m.archive_max_ratio,
                  memory_limit=m.memory_limit, spool_dir=m.spool_dir)


def open_configured_store(config: Config) -> Store:
    """The shared store from ``[store]``."""
    s = config.store
    return open_store(s.backend, sqlite_path=s.sqlite_path, redis_url=s.redis_url,
                      key_prefix=s.key_prefix, timeout=s.timeout)


def _reputation(store: Store, config: Config) -> Reputation | None:
    try:
        return Reputation.from_config(store, config)
    except (AttributeError, ValueError) as exc:
        log.warning("reputation recording off: %s", exc)
        return None


def build_service(
    config: Config,
    *,
    directory: Directory | None = None,
    store: Store | None = None,
    virus_scanner: VirusScanner | None = None,
    spam_scanner: SpamScanner | None = None,
    injector: Injector | None = None,
    resolver: PolicyResolver | None = None,
) -> MilterService:
    """Build the service from the configuration; tests hand in fakes for any part."""
    m = config.milter
    ensure_dir(m.spool_dir)
    if resolver is None:
        if directory is None:
            from mailwarden.ldapdir import LdapDirectory

            directory = LdapDirectory(config.ldap)
        resolver = PolicyResolver(directory, config)
    if store is None:
        store = open_configured_store(config)
    virus_scanner = virus_scanner or ClamdScanner(m.clamd, timeout=m.clamd_timeout,
                                                  retry_after=m.upstream_retry)
    spam_scanner = spam_scanner or SpamdScanner(m.spamd, timeout=m.spamd_timeout,
                                                retry_after=m.upstream_retry, user=m.spamd_user)
    injector = injector or SmtpInjector(m.reinject, timeout=m.reinject_timeout, helo=socket.getfqdn())
    pipeline = Pipeline([
        ExtensionFilter(),
        VirusFilter(virus_scanner, _scan_cache(config, store), max_size=m.clamd_max_size),
        KeywordFilter(text_limit=m.keyword_text_limit, regex_budget=m.keyword_regex_budget),
        SpamFilter(spam_scanner, max_size=m.spamd_max_size, ham_headers=m.spam_headers_on_ham),
    ])
    node = config.general.node_name
    notifier = Notifier(
        NoticeTemplates(m.template_dir, node=node),
        send=lambda to, data: _send_notice(injector, to, data, m.reinject_timeout),
        store=store, limit=m.notice_limit, window=m.notice_window, from_pattern=m.notice_from,
    )
    quarantine = Quarantine(store, m.quarantine_dir, retention_days=m.quarantine_days, node=node)
    return MilterService(config=config, resolver=resolver, pipeline=pipeline,
                         delivery=Delivery(injector, quarantine, notifier),
                         limits=limits_from(config), reputation=_reputation(store, config))


def _scan_cache(config: Config, store: Store) -> ScanCache | None:
    """Shared in Redis for a cluster; in the process for a single node (SQLite)."""
    ttl = config.milter.scan_cache_ttl
    if ttl <= 0:
        return None
    if config.store.backend == "redis":
        return StoreScanCache(store, ttl)
    return LocalScanCache(ttl)


def _send_notice(injector: Injector, to: str, data: bytes, timeout: float) -> None:
    """Notices leave with the null sender, so nothing ever answers them."""
    injector.send("", [(to, ())], [data], deadline=time.monotonic() + timeout)
