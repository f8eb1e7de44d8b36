"""The effective policy: for one address, which services are on, with what settings, from where.

Everything that decides about mail asks ``PolicyResolver.effective_policy``:
the milter, the policy daemon, the CLI and the tests.  Values merge in layers,
built-in default < site config < domain entry < user entry; each value keeps
the layer(s) it came from.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from mailwarden import catalogue
from mailwarden.address import InvalidAddress, matching_pattern, normalize_address, split_address
from mailwarden.cache import TtlLru
from mailwarden.catalogue import SERVICES, SETTINGS, Service, SettingSpec
from mailwarden.config import Config, site_defaults
from mailwarden.directory import Directory, Entry

log = logging.getLogger("mailwarden.policy")


class Layer(StrEnum):
    """Where a value came from."""

    DEFAULT = "default"
    CONFIG = "config"
    DOMAIN = "domain"
    USER = "user"
    ROLE = "role"
    """What a role address is given whatever its domain says (``ROLE_SERVICES``)."""


class AddressKind(StrEnum):
    """What the directory knows about an address."""

    SUBSCRIBER = "subscriber"
    UNKNOWN_USER = "unknown-user"
    """The domain is ours, the mailbox is not."""
    NOT_LOCAL = "not-local"
    """The domain is not hosted here."""
    DOMAIN = "domain"
    """A hosted domain's own defaults (what ``mailwarden domain show`` prints)."""
    ROLE = "role"
    """A role address (``policy.role_addresses``, e.g. postmaster@) of a hosted domain
    without a directory entry of its own: ``canonical`` is where it goes."""


ROLE_SERVICES: Mapping[Service, bool] = {
    Service.VIRUS_SCAN: True,
    Service.EXTENSION_FILTER: True,
    Service.SPAM_CHECK: False,
    Service.KEYWORD_FILTER: False,
    Service.GREYLISTING: False,
    Service.RATE_LIMITS: False,
}
"""A role address's services, whatever its domain's: malware is kept out, but nothing
refuses or files away a complaint (spam reports quote spam) or holds it up."""


@dataclass(frozen=True)
class Sourced:
    """A value and the layers that produced it (several for merged lists)."""

    value: Any
    source: tuple[Layer, ...]

    @property
    def source_text(self) -> str:
        """``domain`` or ``default+user`` for display."""
        return "+".join(self.source)


@dataclass(frozen=True)
class EffectivePolicy:
    """The answer for one address."""

    address: str
    """The address as asked, normalised."""
    kind: AddressKind
    canonical: str | None = None
    """The subscriber's primary address, when the address is a subscriber's; for a role
    address, the address its mail goes to."""
    domain: str | None = None
    """The canonical hosted domain (after domain-alias resolution)."""
    resolved_via: tuple[str, ...] = ()
    """How the address was resolved (alias, domain alias, extension), for display."""
    active: bool = False
    domain_dn: str | None = None
    user_dn: str | None = None
    alternate_addresses: tuple[str, ...] = ()
    domain_aliases: tuple[str, ...] = ()
    services: Mapping[Service, Sourced] = field(default_factory=dict)
    settings: Mapping[str, Sourced] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    """Directory values that were ignored as invalid, each naming DN and attribute."""

    @property
    def is_local(self) -> bool:
        """The address's domain is hosted here."""
        return self.kind is not AddressKind.NOT_LOCAL

    def enabled(self, service: Service) -> bool:
        """Whether ``service`` is on for this address."""
        sourced = self.services.get(service)
        return bool(sourced and sourced.value)

    def get(self, name: str) -> Any:
        """The typed value of a setting."""
        return self.settings[name].value

    def owns_sender(self, sender: str) -> bool:
        """Whether an SMTP-AUTH login with this policy may use ``sender`` as envelope sender.

        Its own addresses and alternate addresses, the same local part in any of the
        domain's aliases, and the ``allowed_senders`` patterns (``user@dom`` or ``@dom``).
        """
        try:
            addr = normalize_address(sender)
        except InvalidAddress:
            return False
        own = {a for a in (self.canonical, *self.alternate_addresses) if a}
        if addr in own:
            return True
        local, dom = split_address(addr)
        if dom in self.domain_aliases or dom == self.domain:
            for a in own:
                a_local, a_dom = split_address(a)
                if a_local == local and a_dom in {self.domain, *self.domain_aliases}:
                    return True
        return self.sender_listed("allowed_senders", addr) is not None

    def sender_listed(self, name: str, sender: str) -> str | None:
        """The pattern of the address-list setting ``name`` (``allowed_senders``,
        ``sender_allowlist``, ``sender_blocklist``) that ``sender`` matches, or None."""
        listed = self.settings.get(name)
        if not listed or not sender:
            return None
        try:
            address = normalize_address(sender)
        except InvalidAddress:
            return None
        return matching_pattern(address, listed.value)


def _merge_union(spec: SettingSpec, layers: list[tuple[Layer, tuple[str, ...]]]) -> Sourced:
    """Concatenate list layers; ``!item`` in a later layer removes an inherited item."""
    items: list[str] = []
    used: list[Layer] = []
    for layer, values in layers:
        if not values:
            continue
        used.append(layer)
        for v in values:
            text = str(v)
            if text.startswith("!"):
                items = [i for i in items if str(i) != text[1:]]
            elif text not in (str(i) for i in items):
                items.append(v)
    return Sourced(tuple(items), tuple(used) or (Layer.DEFAULT,))


class PolicyResolver:
    """Answers ``effective_policy(address)`` from a Directory, with a TTL + LRU cache.

    Positive answers are cached for ``policy.cache_ttl``, unknown addresses for
    ``policy.negative_cache_ttl``, domain entries for ``policy.domain_cache_ttl``
    (absent domains for ``negative_cache_ttl``). Addresses and domains are two caches
    of ``policy.cache_size`` entries each.
    A directory failure is never cached and surfaces as DirectoryUnavailable.
    Thread-safe.
    """

    def __init__(
        self,
        directory: Directory,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.cfg = config.policy
        self.mapping = config.ldap.mapping
        self.clock = clock
        self._site = site_defaults(config)
        self._default_services = {Service.parse(s) for s in self.cfg.default_services}
        self._service_of_value = {
            v.lower(): Service(k) for k, v in self.mapping.service_values.items()
        }
        self._active_values = {v.lower() for v in self.mapping.active_status_values}
        self._cache: TtlLru[str, EffectivePolicy] = TtlLru(self.cfg.cache_size)
        # A domain that does not exist is cached too: the value is a 1-tuple.
        self._domains: TtlLru[str, tuple[Entry | None]] = TtlLru(self.cfg.cache_size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------ cache

    def effective_policy(self, address: str) -> EffectivePolicy:
        """The effective policy of ``address`` (recipient or authenticated sender).

        Raises InvalidAddress for a malformed address and DirectoryUnavailable when
        the directory cannot answer.
        """
        key = normalize_address(address)
        now = self.clock()
        with self._lock:
            found = self._cache.get(key, now)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        policy = self._resolve(key)
        known = policy.kind in (AddressKind.SUBSCRIBER, AddressKind.ROLE)
        ttl = self.cfg.cache_ttl if known else self.cfg.negative_cache_ttl
        if ttl > 0:
            with self._lock:
                self._cache.put(key, policy, now + ttl)
        return policy

    def cached(self, address: str) -> EffectivePolicy | None:
        """The cached, still fresh policy of ``address``, or None (never asks the directory).

        Raises InvalidAddress for a malformed address.
        """
        key = normalize_address(address)
        with self._lock:
            found = self._cache.get(key, self.clock())
            if found is not None:
                self.hits += 1
            return found

    async def lookup(self, address: str) -> EffectivePolicy:
        """:meth:`effective_policy` for code on an event loop: a fresh cached policy at once,
        else the directory is asked in the loop's executor (the loop never waits on it)."""
        policy = self.cached(address)
        if policy is None:
            policy = await asyncio.get_running_loop().run_in_executor(None, self.effective_policy, address)
        return policy

    def invalidate(self, address: str | None = None) -> None:
        """Forget one cached address, or everything (after a directory write)."""
        with self._lock:
            if address is None:
                self._cache.clear()
                self._domains.clear()
            else:
                self._cache.pop(normalize_address(address))

    def resolves_nowhere(self, address: str) -> str | None:
        """Why mail to ``address`` would find nowhere to go here, or None.

        A subscriber, or a role address whose target is one, is somewhere; so is an address
        at a domain not hosted here (the directory cannot judge it).  Raises InvalidAddress
        and DirectoryUnavailable as :meth:`effective_policy` does.
        """
        seen = [normalize_address(address)]
        while True:
            policy = self.effective_policy(seen[-1])
            if policy.kind is AddressKind.UNKNOWN_USER:
                return f"{policy.domain} has no subscriber, alias or role address {seen[-1]}"
            if policy.kind is not AddressKind.ROLE or policy.canonical is None:
                return None
            if policy.canonical in seen:
                return "role addresses going round in a circle: " + " -> ".join([*seen, policy.canonical])
            seen.append(policy.canonical)

    def _domain(self, name: str) -> Entry | None:
        now = self.clock()
        with self._lock:
            cached = self._domains.get(name, now)
        if cached is not None:
            return cached[0]
        entry = self.directory.find_domain(name)
        ttl = self.cfg.domain_cache_ttl if entry is not None else self.cfg.negative_cache_ttl
        if ttl > 0:
            with self._lock:
                self._domains.put(name, (entry,), now + ttl)
        return entry

    # ------------------------------------------------------------ resolution

    def _resolve(self, address: str) -> EffectivePolicy:
        domain_name = split_address(address)[1]
        domain = self._domain(domain_name)
        if domain is None:
            return EffectivePolicy(address=address, kind=AddressKind.NOT_LOCAL)
        canonical_domain = (domain.first("domain_name") or domain_name).lower()
        via: list[str] = []
        if canonical_domain != domain_name:
            via.append(f"domain alias {domain_name} -> {canonical_domain}")
        user = self._find_user(address, canonical_domain, domain, via)
        policy = self.build(address, domain, user, via)
        if user is None:
            return self._role(policy) or policy
        return policy

    def _role(self, policy: EffectivePolicy) -> EffectivePolicy | None:
        """``policy`` (an unknown user) as a role address, when its local part (without an
        extension) is one and it has somewhere to go: the domain's ``admin_address`` (the
        domain's own, and not a role address itself, which would go round in a circle),
        else ``policy.role_mailbox``.  A directory entry with that name wins (the caller
        asks only for unknown users)."""
        roles = self.cfg.role_addresses
        local = self._strip_extension(split_address(policy.address)[0])
        if local not in roles:
            return None
        admin = policy.settings["admin_address"]
        if admin.value and Layer.DOMAIN in admin.source and split_address(admin.value)[0] not in roles:
            target, why = str(admin.value), f"admin_address of {policy.domain}"
        elif self.cfg.role_mailbox:
            target, why = normalize_address(self.cfg.role_mailbox), "[policy] role_mailbox"
        else:
            return None
        services = {**policy.services, **{s: Sourced(on, (Layer.ROLE,)) for s, on in ROLE_SERVICES.items()}}
        return replace(
            policy, kind=AddressKind.ROLE, canonical=target.lower(), active=True, services=services,
            resolved_via=(*policy.resolved_via, f"role address {local}@ -> {why}"),
        )

    def _find_user(
        self, address: str, canonical_domain: str, domain: Entry, via: list[str]
    ) -> Entry | None:
        local, domain_name = split_address(address)
        candidates = [address]
        if canonical_domain != domain_name:
            candidates.append(f"{local}@{canonical_domain}")
        base_local = self._strip_extension(local)
        if base_local != local:
            candidates += [f"{base_local}@{domain_name}", f"{base_local}@{canonical_domain}"]
        seen: set[str] = set()
        for candidate in candidates:
            if candidate in seen:
                continue
            seen.add(candidate)
            if not candidate.split("@", 1)[0].isascii():
                continue  # directory mail attributes are IA5: no such mailbox can exist
            user = self.directory.find_user(candidate, domain)
            if user is not None:
                if split_address(candidate)[0] != local:
                    via.append(f"address extension stripped: {candidate}")
                primary = (user.first("mail") or "").lower()
                if primary and primary != candidate:
                    via.append(f"alternate address of {primary}")
                return user
        return None

    def _strip_extension(self, local: str) -> str:
        delims = self.cfg.recipient_delimiter
        if not delims:
            return local
        cut = min((i for i in (local.find(d) for d in delims) if i > 0), default=-1)
        return local[:cut] if cut > 0 else local

    def build(
        self, address: str, domain: Entry, user: Entry | None, via: list[str] | None = None
    ) -> EffectivePolicy:
        """Merge the layers for a domain entry and an optional user entry."""
        problems: list[str] = [*domain.problems, *(user.problems if user else ())]
        services = self._services(domain, user)
        settings: dict[str, Sourced] = {}
        for name, spec in SETTINGS.items():
            layers: list[tuple[Layer, Any]] = [(Layer.DEFAULT, spec.default)]
            if name in self._site:
                layers.append((Layer.CONFIG, self._site[name]))
            for layer, entry in ((Layer.DOMAIN, domain), (Layer.USER, user)):
                if entry is None or name not in entry.values:
                    continue
                if spec.scope not in ("both", layer.value):
                    problems.append(f"{entry.dn}: {name} is not a {layer.value} setting, ignored")
                    continue
                try:
                    layers.append((layer, spec.parse(entry.values[name])))
                except catalogue.InvalidValue as exc:
                    problems.append(f"{entry.dn}: {exc}; using the inherited value")
            if spec.merge == "union":
                settings[name] = _merge_union(spec, layers)
            else:
                layer, value = layers[-1]
                settings[name] = Sourced(value, (layer,))
        for p in problems:
            log.warning("invalid directory value: %s", p)
        domain_name = (domain.first("domain_name") or split_address(address)[1]).lower()
        if user is None:
            return EffectivePolicy(
                address=address, kind=AddressKind.UNKNOWN_USER, domain=domain_name,
                resolved_via=tuple(via or ()), domain_dn=domain.dn,
                domain_aliases=tuple(a.lower() for a in domain.all("domain_alias")),
                services=services, settings=settings, problems=tuple(problems),
            )
        status = user.first("account_status")
        return EffectivePolicy(
            address=address,
            kind=AddressKind.SUBSCRIBER,
            canonical=(user.first("mail") or address).lower(),
            domain=domain_name,
            resolved_via=tuple(via or ()),
            active=status is None or status.lower() in self._active_values,
            domain_dn=domain.dn,
            user_dn=user.dn,
            alternate_addresses=tuple(a.lower() for a in user.all("alternate_address")),
            domain_aliases=tuple(a.lower() for a in domain.all("domain_alias")),
            services=services,
            settings=settings,
            problems=tuple(problems),
        )

    def _service_set(self, entry: Entry, concept: str) -> set[Service] | None:
        """The services named in a concept; values for other software are skipped."""
        if concept not in entry.values:
            return None
        found = (self._service_of_value.get(v.lower()) for v in entry.values[concept])
        return {s for s in found if s is not None}

    def _services(self, domain: Entry, user: Entry | None) -> dict[Service, Sourced]:
        state: dict[Service, Sourced] = {
            s: Sourced(s in self._default_services,
                       (Layer.CONFIG if s in self._default_services else Layer.DEFAULT,))
            for s in SERVICES
        }
        layers = [(Layer.DOMAIN, domain)] + ([(Layer.USER, user)] if user else [])
        for layer, entry in layers:
            enabled = self._service_set(entry, "enabled_service")
            disabled = self._service_set(entry, "disabled_service") or set()
            replace = self.mapping.service_merge == "replace"
            if enabled is not None and replace:
                for s in SERVICES:
                    state[s] = Sourced(s in enabled and s not in disabled, (layer,))
                continue
            for s in enabled or ():
                state[s] = Sourced(True, (layer,))
            for s in disabled:
                state[s] = Sourced(False, (layer,))
        return state
