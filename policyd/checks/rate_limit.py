"""Rate limits (flow control) per sending user, per hosted sender domain and per client IP.

Counting happens at END-OF-MESSAGE, when Postfix knows the recipient count and the
size: three fixed-window counters per scope, ``rl:<scope>:<id>:m|r|b``, created with
the window as TTL and incremented together, atomically, in one store round trip.  A message that
would take a counter over its limit is refused with 450 4.7.1 and not counted (a
smaller one may still fit); once a limit is reached, ``rl:<scope>:<id>:over`` (same
TTL) makes every later RCPT of that scope wait, before the message is transferred;
the flags of all scopes are read in one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mailwarden.catalogue import Service
from mailwarden.store import Store
from policyd.checks.base import CheckContext, CheckVerdict, Identity, defer
from policyd.config import PolicydConfig, RateScopeConfig

METRICS = (("m", "messages"), ("r", "recipients"), ("b", "bytes"))


@dataclass(frozen=True, slots=True)
class Scope:
    """One counted scope and its limits (0 = unlimited)."""

    kind: str
    """``user``, ``domain`` or ``client``."""
    ident: str
    window: int
    messages: int
    recipients: int
    bytes: int

    @property
    def key(self) -> str:
        """Prefix of this scope's store keys."""
        return f"rl:{self.kind}:{self.ident}"

    def limit(self, metric: str) -> int:
        """The limit of ``messages``, ``recipients`` or ``bytes``."""
        value: int = getattr(self, metric)
        return value

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return bool(self.messages or self.recipients or self.bytes)


def _from_config(kind: str, ident: str, cfg: RateScopeConfig) -> Scope:
    return Scope(kind, ident, cfg.window, cfg.messages, cfg.recipients, cfg.bytes)


class RateLimitCheck:
    """Refuse (450 4.7.1) senders over their message, recipient or byte budget."""

    name: ClassVar[str] = "rate_limit"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT", "END-OF-MESSAGE"})
    services: ClassVar[tuple[Service, ...]] = (Service.RATE_LIMITS,)
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig) -> None:
        self.failure_action = cfg.rate_limit.failure_action
        self.client = cfg.rate_limit.client
        self.sender_domain = cfg.rate_limit.sender_domain

    def scopes(self, ctx: CheckContext) -> list[Scope]:
        """The scopes this request counts against.

        A login or POP-before-SMTP user counts against its own limits (the
        ``rate_limit_*`` settings, when its ``rate_limits`` service is on) and its
        domain's total; an anonymous client against its IP; trusted networks not at all.
        """
        who, policy = ctx.identity()
        if who is Identity.TRUSTED:
            return []
        scopes: list[Scope] = []
        if policy is not None:
            if policy.enabled(Service.RATE_LIMITS):
                scopes.append(Scope(
                    "user", policy.canonical or policy.address, policy.get("rate_limit_window"),
                    policy.get("rate_limit_messages"), policy.get("rate_limit_recipients"),
                    policy.get("rate_limit_bytes"),
                ))
            if policy.domain:
                scopes.append(_from_config("domain", policy.domain, self.sender_domain))
        elif ctx.client_ip is not None:
            scopes.append(_from_config("client", str(ctx.client_ip), self.client))
        return [s for s in scopes if s.limited]

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """RCPT: wait if a limit was reached; END-OF-MESSAGE: count, refuse what goes over."""
        scopes = self.scopes(ctx)
        if not scopes:
            return None
        store = ctx.store
        if ctx.request.stage == "RCPT":
            # Counters change only at END-OF-MESSAGE: one read serves every RCPT of a message.
            verdict: CheckVerdict | None = ctx.memo("rate_limit", lambda: self._over(store, scopes))
            return verdict
        return self._count(ctx, store, scopes)

    @staticmethod
    def _over(store: Store, scopes: list[Scope]) -> CheckVerdict | None:
        flags = store.get_many([scope.key + ":over" for scope in scopes])
        for scope, over in zip(scopes, flags, strict=True):
            if over is not None:
                return defer(
                    f"450 4.7.1 Rate limit reached: {over}; try again later",
                    f"{scope.kind} {scope.ident} over its limit ({over})",
                )
        return None

    def _count(self, ctx: CheckContext, store: Store, scopes: list[Scope]) -> CheckVerdict | None:
        """Add the message to every counter at once; take it back out if any goes over."""
        amounts = {"m": 1, "r": max(ctx.request.number("recipient_count"), 1),
                   "b": ctx.request.number("size")}
        counted: list[tuple[Scope, str, str, int, int]] = []
        for scope in scopes:
            for short, metric in METRICS:
                limit, amount = scope.limit(metric), amounts[short]
                if limit and amount:
                    counted.append((scope, metric, f"{scope.key}:{short}", amount, limit))
        if not counted:
            return None
        values = store.incr_many([(key, amount, scope.window) for scope, _, key, amount, _ in counted])
        for (scope, metric, _, amount, limit), value in zip(counted, values, strict=True):
            if value > limit:
                # Take the message back out of every counter so a retry is not counted twice.
                store.incr_many([(key, -a, None) for _, _, key, a, _ in counted])
                text = f"{metric} limit {limit} per {scope.window} s for {scope.kind} {scope.ident}"
                return defer(
                    f"450 4.7.1 Rate limit exceeded: {text}; try again later",
                    f"{scope.kind} {scope.ident} would exceed {text} ({value - amount}+{amount})",
                )
        for (scope, metric, key, _, limit), value in zip(counted, values, strict=True):
            if value >= limit:
                self._mark_over(store, scope, key, f"{value} {metric} per {scope.window} s "
                                f"for {scope.kind} {scope.ident}")
        return None

    @staticmethod
    def _mark_over(store: Store, scope: Scope, counter: str, text: str) -> None:
        """Refuse this scope at RCPT until its counter's window ends."""
        left = store.ttl(counter)
        store.set(scope.key + ":over", text, ttl=left if left and left > 0 else scope.window)
