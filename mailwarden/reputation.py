"""mailwarden's own reputation of SMTP client IPs and networks, built from outcomes.

The policy daemon and the milter record what happened to mail from a client
(``rejected``, ``virus``, ``spam``, ``clean``); the policy daemon reads a score
that decays with a configurable half-life, per IP and per network (/24, /64).

Counting is atomic across nodes by *forward decay*: an outcome at time ``t`` adds
``weight * 2**((t - T0) / half_life)`` to an integer counter of the epoch that
began at ``T0``; the score at ``now`` is each epoch's counter scaled back by
``2**(-(now - T0) / half_life)``.  Epochs last ``EPOCH_HALF_LIVES`` half-lives and
only the current and the previous one are read, so the factor stays small and
what is dropped had already decayed to under 2 %.

Store keys (values are integers, milli-points):

* ``rep:ip:<address>:<epoch>``
* ``rep:net:<network>/<prefix>:<epoch>``
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from mailwarden.store import Store

if TYPE_CHECKING:
    from mailwarden.config import Config

OUTCOMES = ("rejected", "virus", "spam", "clean")
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "rejected": 1.0, "spam": 3.0, "virus": 5.0, "clean": -0.5,
}
EPOCH_HALF_LIVES = 6
_SCALE = 1000
SETTINGS_SECTION = "policyd"
"""The registered section whose ``reputation`` table configures the reputation."""


@runtime_checkable
class ReputationSettings(Protocol):
    """What the reputation reads from ``[policyd.reputation]``."""

    @property
    def half_life(self) -> float:
        """Seconds after which a recorded outcome counts half."""

    @property
    def weights(self) -> dict[str, float]:
        """Score added per outcome."""

    @property
    def ipv4_prefix(self) -> int:
        """IPv4 network size for the network score."""

    @property
    def ipv6_prefix(self) -> int:
        """IPv6 network size for the network score."""


class Reputation:
    """Record outcomes for client IPs and read their decayed scores from a shared store."""

    def __init__(
        self,
        store: Store,
        *,
        half_life: float = 86400.0,
        weights: Mapping[str, float] | None = None,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not half_life > 0:
            raise ValueError("half_life must be positive")
        self.store = store
        self.half_life = float(half_life)
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(self.weights) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown outcomes {sorted(unknown)} (known: {', '.join(OUTCOMES)})")
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock
        self.epoch_length = EPOCH_HALF_LIVES * self.half_life

    @classmethod
    def from_config(
        cls, store: Store, config: Config, *, clock: Callable[[], float] = time.time
    ) -> Reputation:
        """The reputation as ``[policyd.reputation]`` configures it (shared by daemon and milter).

        Without a registered policy daemon section the built-in defaults apply.
        """
        rc = getattr(config.sections.get(SETTINGS_SECTION), "reputation", None)
        if not isinstance(rc, ReputationSettings):
            return cls(store, clock=clock)
        return cls(
            store, half_life=rc.half_life, weights=rc.weights,
            ipv4_prefix=rc.ipv4_prefix, ipv6_prefix=rc.ipv6_prefix, clock=clock,
        )

    def _keys(self, client_ip: str) -> tuple[str, str]:
        ip = ipaddress.ip_address(client_ip.strip())
        prefix = self.ipv4_prefix if ip.version == 4 else self.ipv6_prefix
        net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        return f"rep:ip:{ip}", f"rep:net:{net}"

    def record(self, client_ip: str, outcome: str) -> None:
        """Count one outcome (``rejected``, ``virus``, ``spam`` or ``clean``) for a client IP.

        Raises ValueError for an unknown outcome or a malformed IP, and
        StoreUnavailable when the store cannot be written.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (known: {', '.join(OUTCOMES)})")
        weight = self.weights.get(outcome, 0.0)
        if weight == 0:
            return
        now = self.clock()
        epoch = math.floor(now / self.epoch_length)
        growth = 2.0 ** ((now - epoch * self.epoch_length) / self.half_life)
        amount = round(weight * growth * _SCALE)
        if amount == 0:
            return
        ttl = 2 * self.epoch_length
        self.store.incr_many([(f"{base}:{epoch}", amount, ttl) for base in self._keys(client_ip)])

    def _scores(self, bases: tuple[str, ...]) -> list[float]:
        """The decayed scores of ``bases`` (this and the previous epoch each), in one store read."""
        now = self.clock()
        epoch = math.floor(now / self.epoch_length)
        epochs = (epoch, epoch - 1)
        raw = self.store.get_many([f"{base}:{e}" for base in bases for e in epochs])
        scores = []
        for i in range(len(bases)):
            total = 0.0
            for j, e in enumerate(epochs):
                value = raw[2 * i + j]
                if value:
                    total += int(value) / _SCALE * 2.0 ** (-(now - e * self.epoch_length) / self.half_life)
            scores.append(max(0.0, total))
        return scores

    def score(self, client_ip: str) -> float:
        """The decayed score of one IP (0 = nothing bad known)."""
        return self._scores(self._keys(client_ip)[:1])[0]

    def network_score(self, client_ip: str) -> float:
        """The decayed score of the IP's network (``ipv4_prefix`` / ``ipv6_prefix``)."""
        return self._scores(self._keys(client_ip)[1:])[0]

    def scores(self, client_ip: str) -> tuple[float, float]:
        """(IP score, network score), read together."""
        ip, net = self._scores(self._keys(client_ip))
        return ip, net
