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

An operator steers it with lists (``mailwarden reputation allow|deny|unlist``), kept
in the same store so every node honours a change at once:

* ``rep:list:allow:<network>`` / ``rep:list:deny:<network>``: the reason, optionally
  with a TTL;
* ``rep:list:version``: bumped by every change.  The version is read with the scores
  (one store round trip), and a process reloads the lists only when it moved.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from mailwarden.store import Increment, Store, StoreUnavailable

if TYPE_CHECKING:
    from mailwarden.config import Config

_log = logging.getLogger("mailwarden.reputation")

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
        items = self.increments(client_ip, outcome)
        if items:
            self.store.incr_many(items)

    def increments(self, client_ip: str, outcome: str) -> list[Increment]:
        """The store increments that count one outcome (none for a weight of 0); raises
        ValueError as :meth:`record` does."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (known: {', '.join(OUTCOMES)})")
        weight = self.weights.get(outcome, 0.0)
        if weight == 0:
            return []
        now = self.clock()
        epoch = math.floor(now / self.epoch_length)
        growth = 2.0 ** ((now - epoch * self.epoch_length) / self.half_life)
        amount = round(weight * growth * _SCALE)
        if amount == 0:
            return []
        ttl = 2 * self.epoch_length
        return [(f"{base}:{epoch}", amount, ttl) for base in self._keys(client_ip)]

    def _read(self, bases: tuple[str, ...], *extra: str) -> tuple[list[float], list[str | None]]:
        """The decayed scores of ``bases`` (this and the previous epoch each) and the values
        of the ``extra`` keys, in one store read."""
        now = self.clock()
        epoch = math.floor(now / self.epoch_length)
        epochs = (epoch, epoch - 1)
        raw = self.store.get_many([f"{base}:{e}" for base in bases for e in epochs] + list(extra))
        scores = []
        for i in range(len(bases)):
            total = 0.0
            for j, e in enumerate(epochs):
                value = raw[2 * i + j]
                if value:
                    total += int(value) / _SCALE * 2.0 ** (-(now - e * self.epoch_length) / self.half_life)
            scores.append(max(0.0, total))
        return scores, raw[2 * len(bases):]

    def _scores(self, bases: tuple[str, ...]) -> list[float]:
        return self._read(bases)[0]

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

    def assess(self, client_ip: str, lists: ReputationLists) -> tuple[float, float, Listing | None]:
        """(IP score, network score, the operator's entry for the IP), in one store read."""
        (ip, net), (version,) = self._read(self._keys(client_ip), LIST_VERSION)
        lists.refresh(version)
        return ip, net, lists.lookup(client_ip)

    def reset(self, target: str) -> int:
        """Forget the scores of an IP, or of a network and every IP in it; the keys removed."""
        net = ipaddress.ip_network(target.strip(), strict=False)
        keys = [k for k in self.store.scan("rep:ip:")
                if _in(k.removeprefix("rep:ip:").rpartition(":")[0], net)]
        if net.num_addresses > 1:
            keys += [k for k in self.store.scan("rep:net:")
                     if _overlaps(k.removeprefix("rep:net:").rpartition(":")[0], net)]
        return self.store.delete(*keys) if keys else 0


def _in(address: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


def _overlaps(network: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_network(network).overlaps(net)
    except (ValueError, TypeError):
        return False


ListKind = Literal["allow", "deny"]
LIST_PREFIX = "rep:list:"
LIST_VERSION = "rep:list:version"


@dataclass(frozen=True)
class Listing:
    """An operator's allow or deny entry."""

    kind: ListKind
    network: str
    reason: str = ""
    source: str = "store"
    """``store`` (``mailwarden reputation``) or ``config`` (``[policyd.reputation]``)."""
    until: float = 0.0
    """When an entry given a time (``--for``) ends; 0: it does not."""


class ReputationLists:
    """The operator's allow and deny lists: the shared store's and the configuration's.

    A lookup costs one store read of the version key; the entries are read again only
    after a change (a scan of ``rep:list:``), so a change is honoured by every process
    on every node from its next lookup.
    """

    def __init__(self, store: Store, *, allow: Sequence[str] = (), deny: Sequence[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        kinds: tuple[tuple[ListKind, Sequence[str]], ...] = (("allow", allow), ("deny", deny))
        self.static = [Listing(kind, str(ipaddress.ip_network(n, strict=False)), "", "config")
                       for kind, networks in kinds for n in networks]
        self._lock = threading.Lock()
        self._version: str | None = "never read"
        self._networks = _parsed(self.static)
        """The entries lookups see, with their networks parsed (the static ones until the
        store's are first read)."""

    def put(self, kind: ListKind, target: str, reason: str = "", ttl: float | None = None) -> Listing:
        """Add (or replace) an entry; the other kind's entry for the same network goes."""
        net = str(ipaddress.ip_network(target.strip(), strict=False))
        other = "deny" if kind == "allow" else "allow"
        self.store.delete(f"{LIST_PREFIX}{other}:{net}")
        now = self.clock()
        until = now + ttl if ttl else 0.0
        # The store forgets the entry after ttl; ``until`` makes a process that read it
        # earlier stop using it at the same time (an expiry does not move the version).
        value = json.dumps({"reason": reason, "at": now, "until": until})
        self.store.set(f"{LIST_PREFIX}{kind}:{net}", value, ttl=ttl)
        self.store.incr(LIST_VERSION)
        return Listing(kind, net, reason, until=until)

    def remove(self, target: str) -> int:
        """Drop both kinds of entry for a network; how many there were."""
        net = str(ipaddress.ip_network(target.strip(), strict=False))
        removed = self.store.delete(f"{LIST_PREFIX}allow:{net}", f"{LIST_PREFIX}deny:{net}")
        self.store.incr(LIST_VERSION)
        return removed

    def entries(self) -> list[Listing]:
        """Every entry, the configuration's first."""
        found = []
        for key in self.store.scan(LIST_PREFIX):
            kind, _, network = key.removeprefix(LIST_PREFIX).partition(":")
            if kind not in ("allow", "deny") or not network:
                continue
            value = self.store.get(key)
            if value is None:
                continue
            try:
                data = json.loads(value)
                reason, until = str(data.get("reason", "")), float(data.get("until") or 0.0)
            except (ValueError, TypeError, AttributeError):
                reason, until = "", 0.0
            found.append(Listing("allow" if kind == "allow" else "deny", network, reason, until=until))
        return [*self.static, *found]

    def refresh(self, version: str | None) -> None:
        """Read the entries again if ``version`` (as read with the scores) moved."""
        with self._lock:
            if version == self._version:
                return
            self._networks = _parsed(self.entries())
            self._version = version

    def lookup(self, client_ip: str) -> Listing | None:
        """The most specific entry in force covering ``client_ip`` (deny wins a tie)."""
        ip = ipaddress.ip_address(client_ip.strip())
        now = self.clock()
        best: Listing | None = None
        best_len = -1
        with self._lock:
            networks = self._networks
        for net, entry in networks:
            if entry.until and entry.until <= now:
                continue
            if ip.version == net.version and ip in net and (
                    net.prefixlen > best_len or (net.prefixlen == best_len and entry.kind == "deny")):
                best, best_len = entry, net.prefixlen
        return best


def _parsed(entries: list[Listing]) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Listing]]:
    return [(ipaddress.ip_network(e.network), e) for e in entries]


class RecordingBatch:
    """Outcomes counted in memory and written to the store together: one transaction per
    ``interval`` seconds, or sooner once ``limit`` counters are waiting.

    The milter counts an outcome for nearly every message.  One store write each (a
    SQLite write transaction on a single node) was a fifth of the milter's busy time in
    the sender-authentication benchmark (``bench/bench_dkim.py``, sampled with py-spy);
    batched, it is one transaction per interval.  A counter's amounts add up exactly
    (forward decay scales each outcome when it is counted), so a batch writes what the
    single writes would have; a process that dies loses at most ``interval`` seconds of
    counts, and the scores are advisory.  :meth:`add` runs on the event loop's thread;
    the writes go to the loop's executor, and :meth:`close` writes what is left.
    """

    def __init__(self, reputation: Reputation, *, interval: float = 0.5, limit: int = 1000) -> None:
        self.reputation = reputation
        self.interval = interval
        self.limit = limit
        self.pending: dict[str, tuple[int, float | None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()

    def add(self, client_ip: str, outcome: str) -> None:
        """Count one outcome (a malformed IP is logged and skipped)."""
        try:
            items = self.reputation.increments(client_ip, outcome)
        except ValueError as exc:
            _log.warning("reputation not recorded for %s: %s", client_ip, exc)
            return
        for key, amount, ttl in items:
            before, _ = self.pending.get(key, (0, ttl))
            self.pending[key] = (before + amount, ttl)
        if len(self.pending) >= self.limit:
            self.flush()
        elif self.pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def take(self) -> list[Increment]:
        """What is waiting, as store increments (and nothing waits any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items = [(key, amount, ttl) for key, (amount, ttl) in self.pending.items() if amount]
        self.pending.clear()
        return items

    def flush(self) -> None:
        """Hand what is waiting to the loop's executor."""
        items = self.take()
        if items:
            write = asyncio.get_running_loop().run_in_executor(None, self.write, items)
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    def write(self, items: Sequence[Increment]) -> None:
        """One store transaction; a store that does not answer loses these counts (logged)."""
        try:
            self.reputation.store.incr_many(items)
        except (StoreUnavailable, ValueError) as exc:
            _log.warning("reputation: %d counter(s) not recorded: %s", len(items), exc)

    async def drain(self) -> None:
        """Write what is waiting and wait for every write under way."""
        self.flush()
        if self._writes:
            await asyncio.gather(*self._writes)

    def close(self) -> None:
        """Before the process ends: write what is left, here and now."""
        items = self.take()
        if items:
            self.write(items)
