"""Wiring from the configuration: directory, store, resolver, checks, and the engine
that runs the checks for one request and turns their verdicts into one Postfix action."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dns.asyncresolver import Resolver as AsyncResolver
from dns.resolver import Resolver

from mailwarden.address import InvalidAddress, normalize_domain
from mailwarden.config import Config
from mailwarden.directory import Directory, DirectoryUnavailable, Entry
from mailwarden.dns import async_twin, make_resolver
from mailwarden.endpoint import Endpoint
from mailwarden.ldapdir import LdapDirectory
from mailwarden.metrics import Backend, TimedDirectory, TimedStore, check_listen, dns_cache
from mailwarden.networks import Networks
from mailwarden.pbs import PopBeforeSmtp
from mailwarden.policy import AddressKind, PolicyResolver
from mailwarden.reputation import OUTCOMES, Reputation, ReputationLists
from mailwarden.store import Store, StoreCall, StoreUnavailable, StoreWrapper, store_of
from policyd.checks import FACTORIES, build_checks
from policyd.checks.base import (
    TEMPFAIL_REPLY,
    Check,
    CheckContext,
    CheckVerdict,
    DnsUnavailable,
    InlineStore,
    IPAddress,
    Kind,
    NeedStore,
    Transaction,
    WouldBlock,
    defer,
)
from policyd.config import SPF_ACTIONS, SPF_RESULTS, PolicydConfig
from policyd.metrics import PolicydMetrics
from policyd.protocol import PolicyRequest

log = logging.getLogger("mailwarden.policyd")

T = TypeVar("T")

BACKEND_ERRORS = (DirectoryUnavailable, StoreUnavailable, DnsUnavailable)


# ---------------------------------------------------------------- configuration


def parse_listen(spec: str) -> tuple[str, str, int]:
    """``unix:/path`` -> ("unix", path, 0); ``inet:host:port`` -> ("inet", host, port).

    ValueError (:class:`~mailwarden.endpoint.EndpointError`) saying what is expected.
    """
    endpoint = Endpoint.parse(spec)
    return endpoint.kind, endpoint.where, endpoint.port


def validate(cfg: PolicydConfig) -> list[str]:
    """Problems in ``[policyd]`` as ``policyd.key: problem`` (empty when fine)."""
    problems: list[str] = []
    _validate_service(cfg, problems)
    _validate_checks(cfg, problems)
    return [f"policyd.{p}" for p in problems]


def _validate_service(cfg: PolicydConfig, problems: list[str]) -> None:
    for i, spec in enumerate(cfg.listen):
        try:
            parse_listen(spec)
        except ValueError as exc:
            problems.append(f"listen[{i}]: {exc}")
    for i, spec in enumerate(cfg.login_report_listen):
        try:
            if parse_listen(spec)[0] != "inet":
                problems.append(f"login_report_listen[{i}]: Dovecot reports over HTTP on TCP: "
                                "use inet:host:port")
        except ValueError as exc:
            problems.append(f"login_report_listen[{i}]: {exc}")
    if not cfg.listen:
        problems.append("listen: at least one socket is needed")
    problems += [p.removeprefix("policyd.") for p in check_listen("policyd", cfg.metrics_listen)]
    if cfg.event_loop not in ("uvloop", "asyncio"):
        problems.append(f"event_loop: {cfg.event_loop!r} is not uvloop or asyncio")
    try:
        if not 0 <= int(cfg.socket_mode, 8) <= 0o777:
            raise ValueError(cfg.socket_mode)
    except ValueError:
        problems.append(f"socket_mode: {cfg.socket_mode!r} is not an octal file mode")
    for key in ("workers", "threads", "max_connections", "max_line_length", "max_request_size",
                "max_attributes"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key}: must be at least 1")
    if not 0 < cfg.request_timeout < 100:
        problems.append("request_timeout: must be above 0 and below Postfix's "
                        "smtpd_policy_service_timeout (100 s)")
    if cfg.idle_timeout <= 0:
        problems.append("idle_timeout: must be greater than 0")
    for key, networks in (("trusted_networks", cfg.trusted_networks),
                          ("reputation.allow_networks", cfg.reputation.allow_networks),
                          ("reputation.deny_networks", cfg.reputation.deny_networks)):
        for i, net in enumerate(networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problems.append(f"{key}[{i}]: {net!r} is not a network")
    if not 0 <= cfg.reputation.dnswl_min_trust <= 3:
        problems.append("reputation.dnswl_min_trust: must be 0 to 3")
    if cfg.login_report_header and ":" not in cfg.login_report_header:
        problems.append("login_report_header: expected 'Name: value'")
    if cfg.login_domain:
        try:
            normalize_domain(cfg.login_domain)
        except InvalidAddress as exc:
            problems.append(f"login_domain: {exc}")


def _validate_checks(cfg: PolicydConfig, problems: list[str]) -> None:
    for i, name in enumerate(cfg.checks):
        if name not in FACTORIES:
            problems.append(f"checks[{i}]: unknown check {name!r} (known: {', '.join(FACTORIES)})")
    tables = [("spf.actions", cfg.spf.actions),
              *((f'spf.domains."{d}"', a) for d, a in cfg.spf.domains.items())]
    for table, actions in tables:
        for result, action in actions.items():
            if result not in SPF_RESULTS or result == "temperror":
                problems.append(f"{table}.{result}: not an SPF result "
                                "(temperror is answered by spf.failure_action)")
            elif action not in SPF_ACTIONS:
                problems.append(f"{table}.{result}: {action!r} is not one of {', '.join(SPF_ACTIONS)}")
    rep = cfg.reputation
    for outcome in rep.weights:
        if outcome not in OUTCOMES:
            problems.append(f"reputation.weights.{outcome}: unknown outcome "
                            f"(known: {', '.join(OUTCOMES)})")
    if rep.half_life <= 0:
        problems.append("reputation.half_life: must be greater than 0")
    if not 8 <= rep.ipv4_prefix <= 32 or not 16 <= rep.ipv6_prefix <= 128:
        problems.append("reputation: ipv4_prefix must be 8..32 and ipv6_prefix 16..128")
    if not 8 <= cfg.greylist.ipv4_prefix <= 32:
        problems.append("greylist.ipv4_prefix: must be 8..32")
    for key in ("retry_window", "max_age"):
        if getattr(cfg.greylist, key) < 1:
            problems.append(f"greylist.{key}: must be at least 1")
    for scope in ("client", "sender_domain"):
        limits = getattr(cfg.rate_limit, scope)
        if limits.window < 1:
            problems.append(f"rate_limit.{scope}.window: must be at least 1")
        for key in ("messages", "recipients", "bytes"):
            if getattr(limits, key) < 0:
                problems.append(f"rate_limit.{scope}.{key}: must not be negative")


# ---------------------------------------------------------------- backends


class InlineGuard:
    """A Directory that refuses to block the event loop: on ``loop_thread`` it raises
    WouldBlock instead of asking LDAP, so only cache hits are answered inline."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.loop_thread: int | None = None

    def _check(self) -> None:
        if self.loop_thread is not None and threading.get_ident() == self.loop_thread:
            raise WouldBlock

    def find_domain(self, domain: str) -> Entry | None:
        """Delegate unless on the loop thread."""
        self._check()
        return self.directory.find_domain(domain)

    def find_user(self, address: str, domain: Entry) -> Entry | None:
        """Delegate unless on the loop thread."""
        self._check()
        return self.directory.find_user(address, domain)

    def domains_with(self, concept: str) -> list[Entry]:
        """Delegate unless on the loop thread."""
        self._check()
        return self.directory.domains_with(concept)

    def modify(self, dn: str, changes: Any) -> None:
        """Delegate unless on the loop thread."""
        self._check()
        self.directory.modify(dn, changes)

    def ping(self) -> None:
        """Delegate unless on the loop thread."""
        self._check()
        self.directory.ping()


class GuardedStore(StoreWrapper):
    """A Store that fails fast while its backend is down.

    After a StoreUnavailable every call fails at once for ``hold_down`` seconds, so
    a dead Redis costs one timeout per second, not one per request.
    """

    def __init__(self, store: Store, *, hold_down: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(store)
        self.hold_down = hold_down
        self.clock = clock
        self._down_until = 0.0
        self._last_error = ""

    def _held_down(self) -> StoreUnavailable | None:
        if self._down_until and self.clock() < self._down_until:
            return StoreUnavailable(f"{self._last_error} (not retried for {self.hold_down:g} s)")
        return None

    def _failed(self, exc: StoreUnavailable) -> None:
        self._last_error = str(exc)
        self._down_until = self.clock() + self.hold_down

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        held = self._held_down()
        if held is not None:
            raise held
        try:
            result = fn(*args, **kwargs)
        except StoreUnavailable as exc:
            self._failed(exc)
            raise
        self._down_until = 0.0
        return result

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """See :meth:`Store.call_many <mailwarden.store.base.Store.call_many>`; one
        StoreUnavailable among the results holds the backend down as a raised one does."""
        held = self._held_down()
        if held is not None:
            return [held] * len(calls)
        results = self.store.call_many(calls)
        failed = next((r for r in results if isinstance(r, StoreUnavailable)), None)
        if failed is not None:
            self._failed(failed)
        else:
            self._down_until = 0.0
        return results


@dataclass
class Services:
    """What the checks may use; handed in, so tests pass fakes."""

    config: Config
    resolver: PolicyResolver
    directory: InlineGuard
    store: Store
    dns: Resolver
    async_dns: AsyncResolver
    """The same resolver for the event loop."""
    reputation: Reputation
    reputation_lists: ReputationLists
    """The operator's allow and deny lists (the store's and ``[policyd.reputation]``'s)."""
    pbs: PopBeforeSmtp
    trusted: Callable[[IPAddress], bool]
    clock: Callable[[], float]
    metrics: PolicydMetrics = field(default_factory=PolicydMetrics)
    """Prometheus metrics (recording nothing unless ``policyd.metrics_listen`` is set)."""
    dns_backend: Backend | None = None
    """Times DNS lookups (metrics on), else None."""

    @property
    def policyd(self) -> PolicydConfig:
        """The ``[policyd]`` section of ``config``."""
        return PolicydConfig.of(self.config)


def build_services(
    config: Config,
    *,
    directory: Directory | None = None,
    store: Store | None = None,
    dns_resolver: Resolver | None = None,
    clock: Callable[[], float] = time.time,
    metrics: PolicydMetrics | None = None,
) -> Services:
    """Services from the configuration; any of the backends may be passed in instead.

    With ``metrics`` on, the directory, the store and DNS are timed."""
    metrics = metrics or PolicydMetrics()
    if directory is None:
        directory = LdapDirectory(config.ldap)
    if store is None:
        store = store_of(config.store)
    if metrics.on:
        directory = TimedDirectory(directory, metrics.backend("ldap"))
        store = TimedStore(store, metrics.backend("store"))
    guard = InlineGuard(directory)
    guarded = GuardedStore(store)
    resolver = dns_resolver if dns_resolver is not None else make_resolver(config.dns)
    reputation = PolicydConfig.of(config).reputation
    policies = PolicyResolver(guard, config)
    if metrics.on:
        poller, cache = metrics.poller, metrics.cache
        poller.add(lambda: policies.hits, cache.labels("policy", "hit"))
        poller.add(lambda: policies.misses, cache.labels("policy", "miss"))
        if (readers := dns_cache(resolver)) is not None:
            poller.add(readers[0], cache.labels("dns", "hit"))
            poller.add(readers[1], cache.labels("dns", "miss"))
    return Services(
        config=config,
        resolver=policies,
        directory=guard,
        store=guarded,
        dns=resolver,
        async_dns=async_twin(resolver),
        reputation=Reputation.from_config(guarded, config, clock=clock),
        reputation_lists=ReputationLists(guarded, allow=reputation.allow_networks,
                                         deny=reputation.deny_networks, clock=clock),
        pbs=PopBeforeSmtp(guarded),
        trusted=Networks(PolicydConfig.of(config).trusted_networks),
        clock=clock,
        metrics=metrics,
        dns_backend=metrics.backend("dns") if metrics.on else None,
    )


# ---------------------------------------------------------------- the engine


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request and why."""

    action: str
    check: str
    reason: str


DUNNO = Decision("DUNNO", "", "")
RESULTS = {kind.value: kind.value.lower() if kind is not Kind.PERMIT else "ok" for kind in Kind}
"""A check's answer (its Kind's value) as a metrics label."""
FAILED = "failed"


def request_tag(request: PolicyRequest) -> str:
    """How a line about a request starts: the queue id (``NOQUEUE`` before Postfix has one)
    and Postfix's ``instance`` (one SMTP transaction), as in the decision line."""
    ids = request["queue_id"] + request.instance
    if not ids.isprintable() or " " in ids or len(ids) > 200:
        return "queue_id=? instance=?"  # junk from the client: left out of the line
    return f"queue_id={request['queue_id'] or 'NOQUEUE'} instance={request.instance or '-'}"


@dataclass(slots=True)
class Evaluation:
    """One request's evaluation: where it is in its checks and what they answered so far
    (kept while it waits for the store, see :class:`NeedStore`)."""

    ctx: CheckContext
    checks: list[Check]
    seen: list[str] | None
    """Check names and answers, for the tally (None: not counted)."""
    spared: bool = False
    """The checks that spare role addresses are skipped."""
    next: int = 0
    """The index of the check to run next (again, when it waits for the store)."""
    permitted: tuple[CheckVerdict, str] | None = None
    prepended: tuple[CheckVerdict, str] | None = None


class Engine:
    """Runs the checks of a request's stage in order and combines their verdicts.

    The first reject or defer wins; otherwise a relay grant (``OK``) wins over a
    PREPEND, which wins over DUNNO.  A check whose backend fails answers with its
    ``failure_action``: ``tempfail`` (451 4.3.0) or ``dunno``.
    """

    def __init__(self, checks: list[Check], services: Services) -> None:
        self.services = services
        self.checks = checks
        self.tally: dict[tuple[str, ...], int] | None = None
        """With metrics on: how many requests saw each sequence of check answers (check
        name, Kind value or ``failed``: its backend failed, name, value, ...); counted once
        a request is decided, so an evaluation redone off the loop counts once.  One
        dictionary update per request; :meth:`check_totals` adds up per check."""
        self.lock = threading.Lock()
        self.by_stage: dict[str, list[Check]] = {}
        for check in checks:
            for stage in check.stages:
                self.by_stage.setdefault(stage, []).append(check)

    def count(self) -> None:
        """Start counting what each check answers (:attr:`tally`)."""
        self.tally = {}

    def check_totals(self) -> dict[tuple[str, str], int]:
        """Answers so far by (check name, Kind value or ``failed``), every pair present."""
        totals = {(c.name, r): 0 for c in self.checks for r in (*RESULTS, FAILED)}
        with self.lock:
            counted = list((self.tally or {}).items())
        for answers, requests in counted:
            for i in range(0, len(answers), 2):
                totals[answers[i], answers[i + 1]] += requests
        return totals

    def decide(self, request: PolicyRequest, txn: Transaction, *, inline: bool) -> Decision:
        """The decision for ``request``; raises WouldBlock only when ``inline``.

        :class:`NeedStore` carries the paused evaluation: make its operation, then
        :meth:`resume`.
        """
        seen: list[str] | None = [] if self.tally is not None else None
        checks = self.by_stage.get(request.stage)
        if not checks:
            self._count(seen)
            return DUNNO
        ctx = CheckContext(request, self.services, txn, inline=inline)
        bad = self._bad_envelope(ctx)
        if bad is not None:
            self._count(seen)
            return bad
        evaluation = Evaluation(ctx, checks, seen)
        evaluation.spared = self._to_role_addresses(ctx)
        return self._go_on(evaluation)

    def resume(self, need: NeedStore, result: Any) -> Decision:
        """Go on with the evaluation ``need`` paused, now that its operation gave ``result``
        (its return value or the exception it raised); may raise WouldBlock again."""
        evaluation: Evaluation = need.evaluation
        store = evaluation.ctx.store
        assert isinstance(store, InlineStore)
        store.record(need.call, result)
        return self._go_on(evaluation)

    def _go_on(self, evaluation: Evaluation) -> Decision:
        """Run the checks from the one the evaluation is at; count the answers once decided."""
        try:
            decision = self._evaluate(evaluation)
        except NeedStore as need:
            need.evaluation = evaluation
            raise
        self._count(evaluation.seen)
        return decision

    def _count(self, seen: list[str] | None) -> None:
        """One decided request's answers into the tally."""
        tally = self.tally
        if seen is not None and tally is not None:
            answers = tuple(seen)
            with self.lock:
                tally[answers] = tally.get(answers, 0) + 1

    def _evaluate(self, evaluation: Evaluation) -> Decision:
        ctx, checks, seen = evaluation.ctx, evaluation.checks, evaluation.seen
        txn = ctx.txn
        inline_store = ctx.store if isinstance(ctx.store, InlineStore) else None
        while evaluation.next < len(checks):
            check = checks[evaluation.next]
            if not (evaluation.spared and check.spares_role_addresses):
                verdict = self._run(check, ctx, seen)
                if seen is not None:
                    # The member's value attribute, not .value: a property call per check.
                    seen += (check.name, verdict.kind._value_ if verdict is not None else "DUNNO")
                if verdict is not None:
                    if verdict.final:
                        if verdict.record_rejection:
                            self._record_rejection(ctx)
                        return Decision(verdict.action, check.name, verdict.reason)
                    if verdict.kind is Kind.PERMIT and evaluation.permitted is None:
                        evaluation.permitted = (verdict, check.name)
                    elif (verdict.kind is Kind.PREPEND and evaluation.prepended is None
                          and check.name not in txn.prepended):
                        evaluation.prepended = (verdict, check.name)
            evaluation.next += 1
            if inline_store is not None and inline_store.made:
                inline_store.forget()
        if evaluation.permitted is not None:
            verdict, name = evaluation.permitted
            return Decision(verdict.action, name, verdict.reason)
        if evaluation.prepended is not None:
            verdict, name = evaluation.prepended
            txn.prepended.add(name)
            return Decision(verdict.action, name, verdict.reason)
        return DUNNO

    def _run(self, check: Check, ctx: CheckContext, seen: list[str] | None) -> CheckVerdict | None:
        try:
            return check.evaluate(ctx)
        except WouldBlock:
            raise
        except BACKEND_ERRORS as exc:
            if seen is not None:
                seen += (check.name, FAILED)
            return self._failed(check, ctx.request, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            if seen is not None:
                seen += (check.name, FAILED)
            log.error("%s check %s failed on %s: %s: %s", request_tag(ctx.request), check.name,
                      ctx.request.stage, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return self._failed(check, ctx.request, f"internal error: {type(exc).__name__}: {exc}")

    @staticmethod
    def _failed(check: Check, request: PolicyRequest, why: str) -> CheckVerdict | None:
        log.warning("%s check %s: backend failure (%s): answering %s", request_tag(request), check.name,
                    why, check.failure_action)
        if check.failure_action == "tempfail":
            return defer(TEMPFAIL_REPLY, f"backend failure: {why}")
        return None

    @staticmethod
    def _bad_envelope(ctx: CheckContext) -> Decision | None:
        try:
            _ = ctx.sender
        except InvalidAddress as exc:
            return Decision("501 5.1.7 Bad sender address syntax", "envelope", str(exc))
        if ctx.request.stage == "RCPT":
            try:
                _ = ctx.recipient
            except InvalidAddress as exc:
                return Decision("501 5.1.3 Bad recipient address syntax", "envelope", str(exc))
        return None

    @staticmethod
    def _to_role_addresses(ctx: CheckContext) -> bool:
        """Whether the request is about mail to role addresses only: at RCPT the
        recipient is one; at END-OF-MESSAGE every recipient of the transaction was.
        When the directory cannot answer, the checks run as for anyone else."""
        values = ctx.txn.values
        if ctx.request.stage == "END-OF-MESSAGE":
            return bool(values.get("role_recipients")) and not values.get("other_recipients")
        if ctx.request.stage != "RCPT":
            return False
        try:
            role = ctx.policy(ctx.recipient).kind is AddressKind.ROLE
        except BACKEND_ERRORS:
            role = False
        values["role_recipients" if role else "other_recipients"] = True
        return role

    def _record_rejection(self, ctx: CheckContext) -> None:
        ip = ctx.client_ip
        if ip is None:
            return
        try:
            self.services.reputation.record(str(ip), "rejected")
        except StoreUnavailable as exc:
            log.warning("reputation not recorded for %s: %s", ip, exc)


class PolicyApp:
    """Services and engine for one process."""

    def __init__(self, config: Config, services: Services | None = None, *,
                 metrics: PolicydMetrics | None = None) -> None:
        self.config = config
        self.services = services if services is not None else build_services(config, metrics=metrics)
        self.engine = Engine(build_checks(config), self.services)
        m = self.services.metrics
        if m.on:
            m.known_checks |= {c.name for c in self.engine.checks}
            engine = self.engine
            engine.count()
            totals = engine.check_totals()
            m.poller.before.append(lambda: totals.update(engine.check_totals()))
            for key in totals:
                check, result = key
                counter = (m.check_failures.labels(check) if result == FAILED
                           else m.check_results.labels(check, RESULTS[result]))
                m.poller.add(lambda k=key: totals[k], counter)  # type: ignore[misc]

    def close(self) -> None:
        """Release the store."""
        with contextlib.suppress(StoreUnavailable):
            self.services.store.close()
