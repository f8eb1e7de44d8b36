"""The milter's Prometheus metrics: what it defines and where each is recorded.

Labels are bounded: verdicts, actions, filter names, backend names and results from a
fixed list, never an address, a host or a virus name.  Made through
:class:`mailwarden.metrics.Metrics`, so with ``metrics_listen`` empty nothing is recorded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from mailwarden.metrics import Backend, DaemonMetrics, Metrics
from milters.reinject import Injector, Origin
from milters.scanners import SpamQuery, SpamResult, SpamScanner, VirusResult, VirusScanner
from milters.verdict import Disposition, Verdict

if TYPE_CHECKING:
    from milters.delivery import Outcome

BACKENDS = ("ldap", "clamd", "spamd", "rspamd", "store", "dns", "reinject")
SPF_RESULTS = frozenset(("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"))
DMARC_RESULTS = frozenset(("pass", "fail", "none", "temperror", "permerror"))


def _virus(found: str) -> str:
    if found.startswith("FOUND"):
        return "found"
    if found.startswith("unscannable"):
        return "unscannable"
    return {"clean": "clean", "error": "error", "too-big": "too_big"}.get(found.partition(" ")[0], "clean")


def _spam(found: str) -> str:
    if found in ("error", "skipped(size)"):
        return found.removesuffix("(size)")
    return "spam" if found.endswith("(spam)") else "ham"


def _keywords(found: str) -> str:
    return "none" if found.startswith("0/") else "hit"


def _word(known: frozenset[str]) -> Callable[[str], str]:
    def result(found: str) -> str:
        word = found.partition("(")[0]
        return word if word in known else "other"

    return result


#: Message-level findings counted (finding key -> bounded result).
FINDINGS: dict[str, Callable[[str], str]] = {
    "virus": _virus, "spam": _spam, "keywords": _keywords,
    "spf": _word(SPF_RESULTS), "dmarc": _word(DMARC_RESULTS),
}


class MilterMetrics(DaemonMetrics):
    """Every metric of one milter worker."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        super().__init__(metrics, "mailwarden_milter", "policy, scan, dns")
        m = self.metrics
        self.messages = m.counter("mailwarden_milter_messages_total",
                                  "messages answered, by verdict (accept/reject/discard/tempfail)",
                                  ["verdict"])
        self.recipients = m.counter(
            "mailwarden_milter_recipients_total",
            "recipients by outcome (deliver/reject/discard/quarantine/tempfail) and the filter that "
            "decided it (none: delivered)", ["action", "filter"])
        self.findings = m.counter(
            "mailwarden_milter_findings_total",
            "filter results per message (virus found/clean/error, spam/ham, keyword hit, SPF, DMARC)",
            ["filter", "result"])
        self.tempfails = m.counter("mailwarden_milter_tempfails_total",
                                   "messages deferred, by cause (a filter, signing, delivery, internal)",
                                   ["cause"])
        self.rcpt_refused = m.counter("mailwarden_milter_rcpt_refused_total",
                                      "recipients refused at RCPT (directory down, bad address)", ["cause"])
        self.message_seconds = m.histogram("mailwarden_milter_message_seconds",
                                           "end-of-message work per message")
        self.failovers = m.counter("mailwarden_milter_backend_failovers_total",
                                   "upstreams put aside after a failure (the next one is tried)", ["backend"])
        self.sessions = m.gauge("mailwarden_milter_sessions", "MTA connections open")
        self.notices = m.counter("mailwarden_milter_notices_total",
                                 "notices by result (sent, limited, failed, dropped)", ["result"])
        self.quarantined = m.counter("mailwarden_milter_quarantined_total", "messages put in quarantine")
        self.quarantine_messages = m.gauge("mailwarden_milter_quarantine_messages",
                                           "messages in the quarantine directory", mode="livemax")
        self.quarantine_bytes = m.gauge("mailwarden_milter_quarantine_bytes",
                                        "bytes in the quarantine directory", mode="livemax")

    def message(self, verdict: Verdict, outcome: Outcome, seconds: float) -> None:
        """Count one answered message, its recipients and its findings."""
        if not self.metrics.on:
            return  # recording nothing: skip the label lookups of every message
        disposition = outcome.disposition
        self.messages.labels(disposition.value).inc()
        for o in verdict.outcomes:
            self.recipients.labels(o.action.value, o.blocked_by or "none").inc()
        if disposition is Disposition.TEMPFAIL:
            cause = next((o.blocked_by for o in verdict.outcomes if o.blocked_by
                          and o.action.value == "tempfail"), "") or "delivery"
            self.tempfails.labels(cause).inc()
        if outcome.quarantine_id:
            self.quarantined.inc()
        findings = verdict.findings
        for key, result in FINDINGS.items():
            found = findings.get(key)
            if found is not None:
                self.findings.labels(key, result(found)).inc()
        self.message_seconds.observe(seconds)

    def failed(self) -> None:
        """A message deferred by an internal error."""
        self.messages.labels(Disposition.TEMPFAIL.value).inc()
        self.tempfails.labels("internal").inc()


class TimedVirusScanner:
    """A VirusScanner whose scans are timed (clamd)."""

    def __init__(self, scanner: VirusScanner, backend: Backend) -> None:
        self.scanner = scanner
        self.backend = backend

    async def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        """Timed scan; a ScanError counts as an error."""
        with self.backend.timed():
            return await self.scanner.scan(stream, deadline)


class TimedSpamScanner:
    """A SpamScanner whose checks are timed (spamd or rspamd)."""

    def __init__(self, scanner: SpamScanner, backend: Backend) -> None:
        self.scanner = scanner
        self.backend = backend

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        """Timed check; a ScanError counts as an error."""
        with self.backend.timed():
            return await self.scanner.check(message, deadline, query)

    async def close(self) -> None:
        """Close the engine's connections, where it holds any (rspamd)."""
        if (close := getattr(self.scanner, "close", None)) is not None and inspect.iscoroutinefunction(close):
            await close()


class TimedInjector:
    """An Injector whose submissions are timed (re-injection and notices)."""

    def __init__(self, injector: Injector, backend: Backend) -> None:
        self.injector = injector
        self.backend = backend

    def send(self, sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
             *, deadline: float, origin: Origin | None = None, mail_params: tuple[str, ...] = ()) -> str:
        """Timed submission; an InjectError counts as an error."""
        with self.backend.timed():
            return self.injector.send(sender, recipients, data, deadline=deadline, origin=origin,
                                      mail_params=mail_params)

