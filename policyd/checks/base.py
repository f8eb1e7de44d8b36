"""What every check shares: verdicts, the per-request context, the check interface."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mailwarden.address import InvalidAddress, normalize_address, split_address
from mailwarden.catalogue import Service
from mailwarden.dnslookup import DnsRecords, resolve_sync
from mailwarden.pbs import PopBeforeSmtp
from mailwarden.policy import AddressKind, EffectivePolicy
from mailwarden.store import Store, StoreCall, StoreWrapper
from policyd.config import FailureAction
from policyd.protocol import PolicyRequest

if TYPE_CHECKING:
    from policyd.app import Services

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Postfix repeats the same client IPs (every RCPT, logins all day).
parsed_ip = functools.lru_cache(maxsize=65536)(ipaddress.ip_address)


class WouldBlock(Exception):
    """Raised on the event-loop thread when an answer needs I/O that may block.

    The request is then evaluated again, from the start, on a worker thread; checks
    therefore look up policies (which may raise this) before they write to the store.
    """


class NeedDns(WouldBlock):
    """Raised on the event-loop thread for DNS answers not yet known in this transaction.

    The server looks ``queries`` up asynchronously, keeps the answers with the
    transaction and evaluates the request again, so DNS never holds a thread.
    """

    def __init__(self, queries: list[tuple[str, str]]) -> None:
        super().__init__(queries)
        self.queries = queries


class NeedStore(WouldBlock):
    """Raised on the event-loop thread for a store operation the request has not made yet.

    The server makes it, pipelined with the operations other connections' requests
    wait for (one round trip for all), and resumes the evaluation at the check that
    asked: that check runs again from its start, and its :class:`InlineStore` answers
    the operations already made from their results, so none is made twice.
    """

    def __init__(self, call: StoreCall) -> None:
        super().__init__(call)
        self.call = call
        self.evaluation: Any = None
        """Where the engine resumes (set by the engine)."""


class InlineStore(StoreWrapper):
    """The store as a check sees it on the event-loop thread: an operation already made for
    this run of the check answers its result (or raises its error) again, in order; a new
    one raises :class:`NeedStore` instead of waiting for the backend.

    A check using it must make the same operations, with the same arguments, when it
    runs again with the same results (no clock or random value in them); an operation
    whose answer the request's context kept (:meth:`CheckContext.memo`) may be left out.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.made: list[tuple[StoreCall, Any]] = []
        self.next = 0

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = StoreCall(fn.__name__, args, kwargs)
        # The same operation made before, in order.  One made before may not come again:
        # its answer was memoized in the request's context (the POP-before-SMTP lookup).
        for index in range(self.next, len(self.made)):
            made, result = self.made[index]
            if made == call:
                self.next = index + 1
                if isinstance(result, Exception):
                    raise result
                return result
        raise NeedStore(call)

    def record(self, call: StoreCall, result: Any) -> None:
        """``call`` was made: ``result`` is its return value or the exception it raised.
        The check is about to run again from its start."""
        self.made.append((call, result))
        self.next = 0

    def forget(self) -> None:
        """The next check starts: the operations made so far are not its own."""
        self.made.clear()
        self.next = 0

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Never on the event loop (raises WouldBlock: the request goes to the thread pool)."""
        raise WouldBlock

    def close(self) -> None:
        """Nothing to release: the store is the daemon's."""


class DnsUnavailable(Exception):
    """The resolver could not answer (timeout, SERVFAIL, no servers)."""


class Kind(Enum):
    """What a verdict tells Postfix."""

    DUNNO = "DUNNO"
    PERMIT = "OK"
    PREPEND = "PREPEND"
    DEFER = "DEFER"
    REJECT = "REJECT"


@dataclass(frozen=True, slots=True)
class CheckVerdict:
    """One check's answer: the Postfix action and the reason for the log."""

    kind: Kind
    action: str
    reason: str
    record_rejection: bool = False
    """Count this answer against the client's reputation (``rejected``)."""

    @property
    def final(self) -> bool:
        """A reject or defer ends the evaluation."""
        return self.kind in (Kind.REJECT, Kind.DEFER)


def reject(reply: str, reason: str, *, record: bool = False) -> CheckVerdict:
    """A permanent refusal; ``reply`` is ``5xx x.y.z text``."""
    return CheckVerdict(Kind.REJECT, reply, reason, record)


def defer(reply: str, reason: str) -> CheckVerdict:
    """A temporary refusal; ``reply`` is ``4xx x.y.z text``."""
    return CheckVerdict(Kind.DEFER, reply, reason)


def permit(reason: str) -> CheckVerdict:
    """Relay granted (Postfix ``OK``)."""
    return CheckVerdict(Kind.PERMIT, "OK", reason)


def prepend(header: str, reason: str) -> CheckVerdict:
    """Add a header to the message (Postfix ``PREPEND``)."""
    return CheckVerdict(Kind.PREPEND, f"PREPEND {header}", reason)


TEMPFAIL_REPLY = "451 4.3.0 Temporary lookup failure, try again later"


class Identity(Enum):
    """How the client is known."""

    TRUSTED = "trusted"
    """A client in ``trusted_networks``."""
    AUTHENTICATED = "sasl"
    """SMTP AUTH login."""
    POP_BEFORE_SMTP = "pbs"
    """A live POP-before-SMTP window for the client IP."""
    ANONYMOUS = "anonymous"


@dataclass
class Transaction:
    """What is remembered for one mail transaction (Postfix ``instance``) on one connection."""

    instance: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    prepended: set[str] = field(default_factory=set)
    """Checks whose PREPEND was sent in this transaction (a header is added once)."""
    dns: dict[tuple[str, str], DnsRecords | Exception] = field(default_factory=dict)
    """DNS answers (or resolver errors) of this transaction, by (name, type)."""


class CheckContext:
    """One request as the checks see it, with memoised lookups.

    ``inline`` is true while the request is evaluated on the event-loop thread;
    then any lookup that could block raises :class:`WouldBlock`.
    """

    __slots__ = ("_local", "_policies", "inline", "request", "services", "store", "txn")

    def __init__(
        self, request: PolicyRequest, services: Services, txn: Transaction, *, inline: bool
    ) -> None:
        self.request = request
        self.services = services
        self.txn = txn
        self.inline = inline
        self.store: Store = InlineStore(services.store) if inline else services.store
        """The shared store for checks whose operations do not depend on the clock: on the
        event loop an :class:`InlineStore` (the operations are made without blocking it),
        on a worker thread the store itself."""
        self._policies: dict[str, EffectivePolicy] = {}
        self._local: dict[str, Any] = {}

    def _once(self, key: str, compute: Callable[[], Any]) -> Any:
        """A value computed once per request (exceptions are not remembered)."""
        local = self._local
        if key not in local:
            local[key] = compute()
        return local[key]

    # ------------------------------------------------------------ lookups

    def dns(self, name: str, rdtype: str) -> DnsRecords:
        """The records of ``name``/``rdtype``: raises DnsUnavailable when the resolver failed.

        Known answers come from the transaction; on the event-loop thread an unknown
        one raises NeedDns (the server resolves it without blocking and asks again),
        on a worker thread it is resolved here.
        """
        key = (name.lower().rstrip("."), rdtype)
        found = self.txn.dns.get(key)
        if found is None:
            if self.inline:
                raise NeedDns([key])
            started = time.perf_counter()
            found = resolve_sync(self.services.dns, *key)
            if self.services.dns_backend is not None:
                self.services.dns_backend.observe(time.perf_counter() - started, isinstance(found, Exception))
            self.txn.dns[key] = found
        if isinstance(found, Exception):
            raise DnsUnavailable(f"{key[0]}/{rdtype}: {found}")
        return found

    def need_dns(self, queries: list[tuple[str, str]]) -> None:
        """Ask for several answers at once (looked up concurrently) before using ``dns()``."""
        missing = [(n.lower().rstrip("."), t) for n, t in queries
                   if (n.lower().rstrip("."), t) not in self.txn.dns]
        if missing and self.inline:
            raise NeedDns(missing)

    def policy(self, address: str) -> EffectivePolicy:
        """The effective policy of ``address`` (cached by the resolver and per request)."""
        found = self._policies.get(address)
        if found is None:
            found = self.services.resolver.effective_policy(address)
            self._policies[address] = found
        return found

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """A value computed once per mail transaction (SPF result, window lookup, ...)."""
        values = self.txn.values
        if key not in values:
            values[key] = compute()
        return values[key]

    # ------------------------------------------------------------ the envelope

    @property
    def client_ip(self) -> IPAddress | None:
        """The client address, or None when Postfix sent none or junk."""
        ip: IPAddress | None = self.memo("client_ip", self._parse_client_ip)
        return ip

    def _parse_client_ip(self) -> IPAddress | None:
        try:
            ip: IPAddress = parsed_ip(self.request.client_address)
        except ValueError:
            return None
        return ip

    @property
    def recipient(self) -> str:
        """The normalised recipient (validated by the engine before checks run)."""
        found: str = self._once("recipient", lambda: normalize_address(self.request.recipient))
        return found

    @property
    def sender(self) -> str:
        """The normalised envelope sender, or ``""`` for the null sender."""
        found: str = self._once("sender", self._normalized_sender)
        return found

    def _normalized_sender(self) -> str:
        raw = self.request.sender
        return normalize_address(raw) if raw.strip("<> ") else ""

    def login_address(self) -> str | None:
        """The SASL login as an address (``login_domain`` appended), or None."""
        found: str | None = self._once("login", self._login_address)
        return found

    def _login_address(self) -> str | None:
        login = self.request.sasl_username.strip()
        if not login:
            return None
        if "@" not in login:
            domain = self.services.policyd.login_domain
            if not domain:
                return None
            login = f"{login}@{domain}"
        try:
            return normalize_address(login)
        except InvalidAddress:
            return None

    def login_policy(self) -> EffectivePolicy | None:
        """The policy of the SASL login when it is a subscriber, else None."""
        address = self.login_address()
        if address is None:
            return None
        found = self.policy(address)
        return found if found.kind is AddressKind.SUBSCRIBER else None

    def pop_before_smtp_user(self) -> str | None:
        """The subscriber with a live POP-before-SMTP window for this client IP, or None."""
        ip = self.client_ip
        if ip is None or not self.services.policyd.relay.pop_before_smtp:
            return None
        user: str | None = self.memo("pbs", lambda: PopBeforeSmtp(self.store).lookup(str(ip)))
        return user

    def is_trusted(self) -> bool:
        """The client is in ``trusted_networks``."""
        ip = self.client_ip
        return ip is not None and self.services.trusted(ip)

    def identity(self) -> tuple[Identity, EffectivePolicy | None]:
        """Who sends: trusted network, SMTP AUTH login, POP-before-SMTP user or anonymous.

        A login or window counts only for an active subscriber with the service on.
        """
        found: tuple[Identity, EffectivePolicy | None] = self._once("identity", self._identity)
        return found

    def _identity(self) -> tuple[Identity, EffectivePolicy | None]:
        if self.is_trusted():
            return Identity.TRUSTED, None
        login = self.login_policy()
        if login is not None and login.active and login.enabled(Service.SMTP_AUTH):
            return Identity.AUTHENTICATED, login
        if self.request.sasl_username:
            return Identity.ANONYMOUS, None
        user = self.pop_before_smtp_user()
        if user is not None:
            found = self.policy(user)
            if found.active and found.enabled(Service.POP_BEFORE_SMTP):
                return Identity.POP_BEFORE_SMTP, found
        return Identity.ANONYMOUS, None


def recipient_domain(ctx: CheckContext) -> str:
    """The recipient's domain, canonical when hosted here (domain aliases resolved)."""
    policy = ctx.policy(ctx.recipient)
    return policy.domain or split_address(ctx.recipient)[1]


class Check(Protocol):
    """A policy check: small, synchronous, never touching sockets.

    ``evaluate`` returns None for "no opinion" (DUNNO). It may raise
    DirectoryUnavailable, StoreUnavailable or DnsUnavailable; the engine then
    answers with the check's ``failure_action``.
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]]
    services: ClassVar[tuple[Service, ...]]
    """The subscriber services the check concerns (documentation and logs)."""
    spares_role_addresses: ClassVar[bool]
    """Not run for mail to role addresses (postmaster@, abuse@): a complaint about a
    poor sender must reach the domain even from that sender."""
    failure_action: FailureAction
    """``tempfail`` or ``dunno`` when a backend fails."""

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """This check's verdict for the request."""
        ...


