"""The policy daemon's Prometheus metrics: what it defines and where each is recorded.

One counter and one histogram per request on the hot path (the counter's series are kept
by stage, check and short action, so recording is a dictionary lookup and two locked
additions); what each check answered, its failures and cache hits are polled from plain
totals once a second.
Labels are bounded: stages, check names and action classes, never an address or an IP.
"""

from __future__ import annotations

from mailwarden.metrics import CounterLike, DaemonMetrics, Metrics
from policyd.protocol import STAGES

ACTIONS = ("ok", "dunno", "prepend", "defer", "reject", "other")
SHORT_ACTION = 24
"""Actions up to this long are remembered with their counter (the fixed words the checks
answer with); a longer one, which may carry an address, is classified each time."""


def action_class(action: str) -> str:
    """A Postfix access(5) action reduced to a bounded class."""
    word = action.partition(" ")[0].upper()
    if word == "DUNNO":
        return "dunno"
    if word == "OK":
        return "ok"
    if word == "PREPEND":
        return "prepend"
    if word[:1] == "4" or word.startswith("DEFER"):
        return "defer"
    if word[:1] == "5" or word == "REJECT":
        return "reject"
    return "other"


class PolicydMetrics(DaemonMetrics):
    """Every metric of one policy daemon worker."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        super().__init__(metrics, "mailwarden_policyd", "policy, dns")
        m = self.metrics
        self.decisions = m.counter(
            "mailwarden_policyd_decisions_total",
            "answers by stage, the check that decided (none: no check did) and action class "
            "(ok/dunno/prepend/defer/reject)", ["stage", "check", "action"])
        self.request_seconds = m.histogram("mailwarden_policyd_request_seconds",
                                           "time from reading a request to answering it")
        self.check_results = m.counter(
            "mailwarden_policyd_check_results_total",
            "what each check answered (ok/dunno/prepend/defer/reject), whether or not it decided",
            ["check", "result"])
        self.check_failures = m.counter("mailwarden_policyd_check_failures_total",
                                        "checks whose backend failed (answered with their failure_action)",
                                        ["check"])
        self.connections = m.gauge("mailwarden_policyd_connections", "Postfix connections open")
        self.refused = m.counter("mailwarden_policyd_connections_refused_total",
                                 "connections closed at once (max_connections reached)")
        self.known_checks = {"envelope", "deadline", "internal", "malformed"}
        """Values of the ``check`` label besides ``none``: these and the configured checks."""
        self._children: dict[tuple[str, str, str], CounterLike] = {}
        self._latency = self.request_seconds.labels()

    def decided(self, stage: str, check: str, action: str, seconds: float) -> None:
        """Count one answer and its time."""
        if not self.on:
            return
        key = (stage, check, action)
        child = self._children.get(key)
        if child is None:
            child = self.decisions.labels(stage if stage in STAGES else "other",
                                          check if check in self.known_checks else "none",
                                          action_class(action))
            if len(action) <= SHORT_ACTION:  # OK, DUNNO, ...: a few; longer ones may name addresses
                self._children[key] = child
        child.inc()
        self._latency.observe(seconds)
