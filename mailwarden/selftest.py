"""``mailwarden selftest``: every configured backend probed the way the daemons use it.

A probe does what a daemon does (bind and look up, write and read, scan, resolve,
open an SMTP session) and answers with one :class:`Row`: ok, unavailable (the
service does not answer: exit 75, like a daemon's temporary failure) or
misconfigured (it answers, but not as mailwarden needs: exit 78), with what is
wrong and how to fix it.

The core probes its own backends (directory, store, DNS).  A daemon adds its own
through its registered :class:`~mailwarden.config.Section` (``selftest``), so the
core names no daemon.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import dns.exception
import dns.resolver

from mailwarden.config import Config, registered_sections

EX_OK, EX_TEMPFAIL, EX_CONFIG = 0, 75, 78


class Status(Enum):
    """A probe's result."""

    OK = "ok"
    UNAVAILABLE = "unavailable"
    MISCONFIGURED = "misconfigured"


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    @classmethod
    def ok(cls, name: str, detail: str) -> Row:
        """A probe that passed."""
        return cls(name, Status.OK, detail)


class ProbeFailed(Exception):
    """Raised by a probe: the backend is unavailable (or, with ``status``, misconfigured)."""

    def __init__(self, detail: str, hint: str, status: Status = Status.UNAVAILABLE) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint
        self.status = status


Probe = Callable[[Config], str]
"""Probe the backend; return what was seen (the row's detail); raise :class:`ProbeFailed`."""


def _directory(config: Config) -> str:
    from mailwarden.directory import DirectoryUnavailable
    from mailwarden.ldapdir import LdapDirectory
    from mailwarden.policy import PolicyResolver

    where = config.ldap.uri
    directory = LdapDirectory(config.ldap)
    try:
        directory.ping()
        address = config.general.selftest_address
        if not address:
            return f"bound to {where} (no [general] selftest_address to look up)"
        policy = PolicyResolver(directory, config).effective_policy(address)
    except DirectoryUnavailable as exc:
        raise ProbeFailed(str(exc), "is slapd running and reachable? check [ldap] uri, "
                          "bind_dn and bind_password") from None
    if not policy.user_dn:
        raise ProbeFailed(f"{address}: no subscriber entry ({policy.kind.value})",
                          "set [general] selftest_address to a subscriber in the directory, or check "
                          "[ldap] base_dn and the [ldap.mapping] filters", Status.MISCONFIGURED)
    return f"bound to {where}; {address} is {policy.user_dn}"


def _store(config: Config) -> str:
    from mailwarden.store import StoreUnavailable, store_of

    cfg = config.store
    where = cfg.redis_url if cfg.backend == "redis" else cfg.sqlite_path
    hint = ("is redis-server running? check [store] redis_url" if cfg.backend == "redis" else
            "does the directory of [store] sqlite_path exist, writable by the daemons' user?")
    key = f"selftest:{config.general.node_name}:{secrets.token_hex(4)}"
    value = secrets.token_hex(8)
    try:
        store = store_of(cfg)
        try:
            store.set(key, value, ttl=30)
            if store.get(key) != value:
                raise ProbeFailed(f"{where}: a value written was not read back", hint, Status.MISCONFIGURED)
            store.expire(key, 0.05)
            time.sleep(0.1)
            if store.get(key) is not None:
                raise ProbeFailed(f"{where}: a key did not expire", "the store must honour TTLs "
                                  "(for Redis: no maxmemory-policy that keeps volatile keys)",
                                  Status.MISCONFIGURED)
        finally:
            store.delete(key)
            store.close()
    except StoreUnavailable as exc:
        raise ProbeFailed(f"{cfg.backend} {where}: {exc}", hint) from None
    return f"{cfg.backend} {where}: write, read, expire"


def _dns(config: Config) -> str:
    from mailwarden.dns import make_resolver

    cfg = config.dns
    where = ", ".join(f"{ns}:{cfg.port}" for ns in cfg.nameservers)
    address = config.general.selftest_address
    name = address.rpartition("@")[2] if "@" in address else "localhost"
    try:
        answer = make_resolver(cfg).resolve(name, "MX" if "@" in address else "A")
        seen = f"{len(answer)} {answer.rdtype.name} record(s)"
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
        seen = type(exc).__name__
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        raise ProbeFailed(f"{where}: {type(exc).__name__}: {exc}",
                          "is the resolver running and answering on that address? check [dns] "
                          "nameservers and port") from None
    return f"{where}: {name} -> {seen}"


CORE_PROBES: tuple[tuple[str, Probe], ...] = (("ldap", _directory), ("store", _store), ("dns", _dns))


def probes() -> list[tuple[str, Probe]]:
    """The core's probes, then each registered section's (in section order)."""
    found = list(CORE_PROBES)
    for section in registered_sections().values():
        if section.selftest is not None:
            found.extend(section.selftest())
    return found


def run_probes(config: Config, chosen: Sequence[tuple[str, Probe]]) -> list[Row]:
    """Run the probes side by side (each bounded by its backend's configured timeouts)."""

    def one(item: tuple[str, Probe]) -> Row:
        name, probe = item
        try:
            return Row.ok(name, probe(config))
        except ProbeFailed as exc:
            return Row(name, exc.status, exc.detail, exc.hint)
        except Exception as exc:  # noqa: BLE001 - a probe's surprise is still one row
            return Row(name, Status.UNAVAILABLE, f"{type(exc).__name__}: {exc}",
                       "unexpected; see the daemon's log for the same backend")

    with ThreadPoolExecutor(max_workers=max(len(chosen), 1)) as pool:
        return list(pool.map(one, chosen))


def exit_status(rows: Sequence[Row]) -> int:
    """78 when something is misconfigured, else 75 when something is unavailable, else 0."""
    statuses = {r.status for r in rows}
    if Status.MISCONFIGURED in statuses:
        return EX_CONFIG
    return EX_TEMPFAIL if Status.UNAVAILABLE in statuses else EX_OK


def table(rows: Sequence[Row]) -> list[str]:
    """The rows as aligned text: check, status, what was seen or is wrong, how to fix it."""
    width = max([len(r.name) for r in rows] + [5])
    out = [f"{'check':<{width}}  {'status':<13}  detail"]
    for r in rows:
        out.append(f"{r.name:<{width}}  {r.status.value:<13}  {r.detail}")
        if r.hint:
            out.append(f"{'':<{width}}  {'':<13}  fix: {r.hint}")
    return out
