"""Wiring: the configured resolver, store, scanners, filters and delivery, shared by
every milter connection, and the one place a finished message is decided and logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from mailwarden.config import Config, ConfigError
from mailwarden.directory import Directory
from mailwarden.dns import make_resolver
from mailwarden.linelog import DecisionLog
from mailwarden.logfields import NOQUEUE, new_mwid
from mailwarden.metrics import TimedDirectory, TimedStore, dns_cache
from mailwarden.networks import Networks
from mailwarden.notify import NOTICE_RESULTS, NoticeTemplates, Notifier
from mailwarden.pbs import PopBeforeSmtp
from mailwarden.policy import PolicyResolver
from mailwarden.render import RenderError, archive_master_password, default_mailbox_host
from mailwarden.reputation import RecordingBatch, Reputation
from mailwarden.store import Store, StoreUnavailable, async_store_of, store_of
from milters.archive import Archiver
from milters.archivestore import CopyStore, ImapStore, LmtpStore
from milters.config import MilterConfig
from milters.delivery import Delivery, MilterActions, Outcome
from milters.filters import INTERNAL, Backends, Envelope, Filter
from milters.filters.extensions import ExtensionFilter
from milters.filters.keywords import KeywordFilter
from milters.filters.sender_auth import SenderAuthFilter
from milters.filters.spam import SpamFilter
from milters.filters.virus import LocalScanCache, StoreScanCache, VirusFilter
from milters.message import BodySpool, HeaderList, Limits, Message, ensure_dir
from milters.metrics import MilterMetrics, TimedInjector, TimedSpamScanner, TimedVirusScanner
from milters.pipeline import Pipeline
from milters.quarantine import Quarantine
from milters.reinject import Injector, SmtpInjector
from milters.scanners import ScanCache, SpamScanner, VirusScanner
from milters.scanners.clamd import ClamdScanner
from milters.scanners.rspamd import RspamdScanner
from milters.scanners.spamd import SpamdScanner
from milters.scanners.upstreams import Upstreams
from milters.signing import Sealer, Signer, Signing, SigningUnavailable
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
    reputation: RecordingBatch | None = None
    """The clients' reputation, counted in batches (None: not recorded)."""
    signing: Signing | None = None
    """DKIM signing of subscribers' mail (None: off)."""
    archiver: Archiver | None = None
    """The archive of passing mail (None: off)."""
    pbs: PopBeforeSmtp | None = None
    """POP-before-SMTP windows (None: not looked at)."""
    internal: Callable[[str], bool] = field(default_factory=lambda: Networks([]).contains)
    """Whether a client address is in ``milter.internal_networks``."""
    lines: DecisionLog = field(default_factory=lambda: DecisionLog(log))
    """The one-line-per-message log (batched on the event loop)."""
    metrics: MilterMetrics = field(default_factory=MilterMetrics)
    """Prometheus metrics (recording nothing unless ``milter.metrics_listen`` is set)."""
    settings: MilterConfig = field(init=False)
    """The ``[milter]`` section."""

    def __post_init__(self) -> None:
        self.settings = MilterConfig.of(self.config)

    def new_spool(self) -> BodySpool:
        """A body spool with the configured memory limit."""
        return BodySpool(self.limits.memory_limit, self.limits.spool_dir)

    async def process(self, envelope: Envelope, headers: HeaderList, spool: BodySpool,
                      recipients: Sequence[Recipient], actions: MilterActions) -> Outcome:
        """Decide and carry out one message; log one line; never raises for bad input."""
        started = time.monotonic()
        deadline = started + self.settings.eom_budget
        message = Message(headers, spool, self.limits)
        envelope = await self._identify(replace(envelope, mwid=envelope.mwid or new_mwid()))
        verdict = await self.pipeline.run(envelope, message, recipients, deadline)
        signer = await self._signer(envelope, message, verdict)
        if signer is not None:
            verdict.findings["signed"] = signer.domain + ":" + "+".join(k.selector for k in signer.keys)
        sealers = await self._sealers(envelope, verdict)
        if self.archiver is not None and verdict.disposition is Disposition.ACCEPT:
            archived = await self.archiver.archive(envelope, verdict, message, deadline)
            if archived:
                verdict.findings["archive"] = ",".join(archived)
        outcome = await self.delivery.carry_out(verdict, message, envelope, actions, deadline=deadline,
                                                signer=signer, sealers=sealers)
        self._log(envelope, message, verdict, outcome, started)
        self.metrics.message(verdict, outcome, time.monotonic() - started)
        kind = self.reputation_kind(envelope, verdict, outcome)
        if kind is not None and self.reputation is not None:
            # Counted now, written with others shortly: the reply waits for no store write.
            self.reputation.add(envelope.client_address, kind)
        return outcome

    async def _identify(self, envelope: Envelope) -> Envelope:
        """The envelope with its ``submitter``: a client without SMTP AUTH in
        ``internal_networks``, or one with an open POP-before-SMTP window (a store read in
        the executor; a store that does not answer leaves the client anonymous, which
        signs nothing and judges it as inbound mail)."""
        if envelope.auth_login or not envelope.client_address:
            return envelope
        if self.internal(envelope.client_address):
            return replace(envelope, submitter=INTERNAL)
        if self.pbs is None:
            return envelope
        loop = asyncio.get_running_loop()
        try:
            user = await loop.run_in_executor(None, self.pbs.lookup, envelope.client_address)
        except (StoreUnavailable, ValueError) as exc:
            log.warning("%s POP-before-SMTP window of %s not read: %s", envelope.tag,
                        envelope.client_address, exc)
            return envelope
        return replace(envelope, submitter=user) if user else envelope

    async def _signer(self, envelope: Envelope, message: Message, verdict: Verdict) -> Signer | None:
        """Who signs the message (None: nobody); a message that cannot be signed as it must
        is deferred, for everyone."""
        if self.signing is None or verdict.disposition is not Disposition.ACCEPT:
            return None
        try:
            return await self.signing.signer_for(envelope, message)
        except SigningUnavailable as exc:
            log.error("%s DKIM signing: %s", envelope.tag, exc)
            for outcome in verdict.outcomes:
                outcome.block(Action.TEMPFAIL, "DKIM signing unavailable")
                outcome.blocked_by = outcome.blocked_by or "signing"
            return None

    async def _sealers(self, envelope: Envelope, verdict: Verdict) -> dict[str, Sealer]:
        """The ARC seals of forwarding recipients' copies (none when the chain could not be
        checked: a seal must state pass, fail or none)."""
        if self.signing is None or verdict.disposition is not Disposition.ACCEPT:
            return {}
        if verdict.findings.get("arc") == "temperror":
            return {}
        sealers = await self.signing.sealers_for(verdict.outcomes, envelope.queue_id)
        if sealers:
            verdict.findings["arc_seal"] = ",".join(sorted({s.domain for s in sealers.values()}))
        return sealers

    async def watch(self, sessions: Callable[[], int], every: float = 1.0,
                    usage_every: float = 60.0) -> None:
        """With metrics on: each second the open sessions and the polled totals, then the
        values written for the exporter; each minute the quarantine's size (in the
        executor); until cancelled."""
        metrics = self.metrics
        if not metrics.metrics.on:
            return
        loop = asyncio.get_running_loop()
        quarantine = self.delivery.quarantine
        usage_due = 0.0
        try:
            while True:
                metrics.sessions.set(sessions())
                metrics.publish()
                if quarantine is not None and time.monotonic() >= usage_due:
                    usage_due = time.monotonic() + usage_every
                    count, size = await loop.run_in_executor(None, quarantine.usage)
                    metrics.quarantine_messages.set(count)
                    metrics.quarantine_bytes.set(size)
                await asyncio.sleep(every)
        finally:
            metrics.sessions.set(0)
            metrics.publish()

    def close(self) -> None:
        """Before the process ends: send the notices still waiting, end the archive's sessions."""
        self.delivery.close(self.settings.reinject_timeout)
        if self.reputation is not None:
            self.reputation.close()
        if self.archiver is not None:
            self.archiver.store.close()

    def _log(self, envelope: Envelope, message: Message, verdict: Verdict, outcome: Outcome,
             started: float) -> None:
        parts = [
            f"{envelope.queue_id or NOQUEUE}: {outcome.disposition.value}",
            f"mwid={envelope.mwid}",
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

    def reputation_kind(self, envelope: Envelope, verdict: Verdict, outcome: Outcome) -> str | None:
        """What this message says about its client (virus, spam, rejected, clean), or None
        when nothing is recorded (no reputation, a local client, a deferred message)."""
        address = envelope.client_address
        if self.reputation is None or not address:
            return None
        try:
            if address.startswith("127.") or address == "::1" or ipaddress.ip_address(address).is_loopback:
                return None  # local submissions and tests say nothing about a client's reputation
        except ValueError:
            return None
        findings = verdict.findings
        if findings.get("virus", "").startswith("FOUND"):
            return "virus"
        if findings.get("spam", "").endswith("(spam)"):
            return "spam"
        if outcome.disposition is Disposition.REJECT:
            return "rejected"
        if outcome.disposition is Disposition.ACCEPT:
            return "clean"
        return None


def limits_from(config: Config) -> Limits:
    """The parse and archive limits from ``[milter]``."""
    m = MilterConfig.of(config)
    return Limits(max_parts=m.max_parts, max_depth=min(m.max_depth, 100),
                  archive_max_depth=m.archive_max_depth, archive_max_members=m.archive_max_members,
                  archive_max_size=m.archive_max_size, archive_max_ratio=m.archive_max_ratio,
                  memory_limit=m.memory_limit, spool_dir=m.spool_dir)


def _reputation(store: Store, config: Config) -> RecordingBatch | None:
    try:
        return RecordingBatch(Reputation.from_config(store, config))
    except (AttributeError, ValueError) as exc:
        log.warning("reputation recording off: %s", exc)
        return None


#: The filters in the order they run (cheapest and most decisive first; see
#: :mod:`milters.pipeline`): a new filter is a file in ``milters/filters/`` and a line here.
#: A ``build`` that returns None leaves its filter out (switched off in the configuration).
FILTERS: tuple[Callable[[Backends], Filter | None], ...] = (
    ExtensionFilter.build,
    VirusFilter.build,
    SenderAuthFilter.build,
    KeywordFilter.build,
    SpamFilter.build,
)


def spam_engine(m: MilterConfig) -> SpamScanner:
    """The client of ``milter.spam_engine``: spamd or rspamd, over their upstreams."""
    if m.spam_engine == "rspamd":
        return RspamdScanner(m.rspamd, timeout=m.rspamd_timeout, retry_after=m.upstream_retry,
                             skip_auth=m.rspamd_skip_auth)
    return SpamdScanner(m.spamd, timeout=m.spamd_timeout, retry_after=m.upstream_retry, user=m.spamd_user)


def built_filters(backends: Backends) -> list[Filter]:
    """The filters of :data:`FILTERS` that the configuration switches on, in order."""
    return [f for f in (build(backends) for build in FILTERS) if f is not None]


def build_service(
    config: Config,
    *,
    directory: Directory | None = None,
    store: Store | None = None,
    virus_scanner: VirusScanner | None = None,
    spam_scanner: SpamScanner | None = None,
    injector: Injector | None = None,
    resolver: PolicyResolver | None = None,
    metrics: MilterMetrics | None = None,
) -> MilterService:
    """Build the service from the configuration; tests hand in fakes for any part.

    With ``metrics`` on, the directory, store, scanners and re-injection are timed."""
    m = MilterConfig.of(config)
    ensure_dir(m.spool_dir)
    metrics = metrics or MilterMetrics()
    on = metrics.metrics.on
    if resolver is None:
        if directory is None:
            from mailwarden.ldapdir import LdapDirectory

            directory = LdapDirectory(config.ldap)
        if on:
            directory = TimedDirectory(directory, metrics.backend("ldap"))
        resolver = PolicyResolver(directory, config)
    if store is None:
        store = store_of(config.store)
    if on:
        store = TimedStore(store, metrics.backend("store"))
    clamd = virus_scanner or ClamdScanner(m.clamd, timeout=m.clamd_timeout, retry_after=m.upstream_retry)
    spamd = spam_scanner or spam_engine(m)
    dns_resolver = make_resolver(config.dns)
    backends = Backends(
        config=m,
        virus_scanner=TimedVirusScanner(clamd, metrics.backend("clamd")) if on else clamd,
        spam_scanner=TimedSpamScanner(spamd, metrics.backend(m.spam_engine)) if on else spamd,
        scan_cache=_scan_cache(config, store),
        resolver=dns_resolver,
        node_name=config.general.node_name,
        dns_backend=metrics.backend("dns") if on else None,
    )
    injector = injector or SmtpInjector(m.reinject, timeout=m.reinject_timeout, helo=socket.getfqdn())
    if on:
        injector = TimedInjector(injector, metrics.backend("reinject"))
    node = config.general.node_name
    notifier = Notifier(
        NoticeTemplates(m.template_dir, node=node),
        send=lambda to, data: _send_notice(injector, to, data, m.reinject_timeout),
        store=store, limit=m.notice_limit, window=m.notice_window, from_pattern=m.notice_from,
    )
    quarantine = Quarantine(store, m.quarantine_dir, retention_days=m.quarantine_days, node=node)
    pipeline = Pipeline(built_filters(backends))
    delivery = Delivery(injector, quarantine, notifier)
    if on:
        _follow(metrics, resolver, pipeline, delivery, dns_resolver=dns_resolver,
                scanners={"clamd": clamd, m.spam_engine: spamd})
    return MilterService(config=config, resolver=resolver, pipeline=pipeline, delivery=delivery,
                         metrics=metrics,
                         limits=limits_from(config), reputation=_reputation(store, config),
                         signing=Signing(resolver, m.dkim_key_path,
                                         (m.authserv_id or node).lower() if m.sender_auth else ""),
                         pbs=PopBeforeSmtp(store) if m.pop_before_smtp else None,
                         archiver=Archiver(resolver, archive_store(config), node=node,
                                           default_host=default_mailbox_host(config)),
                         internal=Networks(m.internal_networks).contains)


def archive_store(config: Config) -> CopyStore:
    """Where archive copies go: IMAP MULTIAPPEND when ``[render] archive_imap_port`` is set,
    else LMTP.  Raises ConfigError when the master user's password cannot be read."""
    r, m = config.render, MilterConfig.of(config)
    if not r.archive_imap_port:
        return LmtpStore(r.mailbox_port, m.archive_timeout, config.general.node_name)
    try:
        password = archive_master_password(r)
    except RenderError as exc:
        raise ConfigError(exc.problems) from None
    return ImapStore(r.archive_imap_port, r.archive_master_user, password, m.archive_timeout,
                     lanes=m.archive_imap_sessions)


def _follow(metrics: MilterMetrics, resolver: PolicyResolver, pipeline: Pipeline, delivery: Delivery, *,
            dns_resolver: object, scanners: dict[str, object]) -> None:
    """Totals kept as plain integers, moved into counters once a second."""
    poller, cache = metrics.poller, metrics.cache
    poller.add(lambda: resolver.hits, cache.labels("policy", "hit"))
    poller.add(lambda: resolver.misses, cache.labels("policy", "miss"))
    for flt in pipeline.filters:
        if isinstance(flt, VirusFilter) and flt.cache is not None:
            poller.add(lambda f=flt: f.hits, cache.labels("scan", "hit"))  # type: ignore[misc]
            poller.add(lambda f=flt: f.misses, cache.labels("scan", "miss"))  # type: ignore[misc]
    if (readers := dns_cache(dns_resolver)) is not None:
        poller.add(readers[0], cache.labels("dns", "hit"))
        poller.add(readers[1], cache.labels("dns", "miss"))
    for name, scanner in scanners.items():
        upstreams = getattr(scanner, "upstreams", None)
        if isinstance(upstreams, Upstreams):
            poller.add(lambda u=upstreams: u.failures, metrics.failovers.labels(name))  # type: ignore[misc]
    if (outbox := delivery.outbox) is not None:
        for result in NOTICE_RESULTS:
            poller.add(lambda r=result: outbox.results[r], metrics.notices.labels(result))  # type: ignore[misc]


def _scan_cache(config: Config, store: Store) -> ScanCache | None:
    """Shared in Redis for a cluster; in the process for a single node (SQLite)."""
    ttl = MilterConfig.of(config).scan_cache_ttl
    if ttl <= 0:
        return None
    if config.store.backend == "redis":
        return StoreScanCache(async_store_of(config.store), ttl)
    return LocalScanCache(ttl)


def _send_notice(injector: Injector, to: str, data: bytes, timeout: float) -> None:
    """Notices leave with the null sender, so nothing ever answers them."""
    injector.send("", [(to, ())], [data], deadline=time.monotonic() + timeout)
