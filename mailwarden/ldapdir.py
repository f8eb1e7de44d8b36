"""The LDAP adapter of the Directory interface, driven by the attribute mapping."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import ldap.filter
from ldap.ldapobject import ReconnectLDAPObject

import ldap
from mailwarden.address import split_address
from mailwarden.config import LdapConfig, bind_password
from mailwarden.directory import DirectoryError, DirectoryUnavailable, Entry, NoSuchEntry

log = logging.getLogger("mailwarden.ldap")

T = TypeVar("T")

# Errors that mean "the directory cannot answer now" rather than "the request is wrong".
_UNAVAILABLE: tuple[type[Exception], ...] = (
    ldap.SERVER_DOWN,
    ldap.TIMEOUT,
    ldap.CONNECT_ERROR,
    ldap.UNAVAILABLE,
    ldap.BUSY,
    ldap.TIMELIMIT_EXCEEDED,
    ldap.ADMINLIMIT_EXCEEDED,
    ldap.SIZELIMIT_EXCEEDED,
    ldap.OTHER,
    ldap.UNWILLING_TO_PERFORM,
    ldap.INVALID_CREDENTIALS,
    ldap.STRONG_AUTH_REQUIRED,
    ldap.CONFIDENTIALITY_REQUIRED,
)


def _describe(exc: Exception) -> str:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    desc = info.get("desc", type(exc).__name__)
    extra = info.get("info")
    return f"{desc} ({extra})" if extra else str(desc)


class LdapDirectory:
    """Directory backed by an LDAP server (OpenLDAP or any RFC 4511 server).

    One ReconnectLDAPObject per process for lookups, guarded by a lock: python-ldap
    serialises calls on a connection anyway, and a lookup takes ~0.15 ms. ``uri`` may
    list several servers (a provider and its syncrepl consumers): libldap connects to
    the first that answers, and after a failure the reconnect tries them again in order.
    The lookup connection stays on the server it reached until that one fails.
    Changes (:meth:`modify`) have a connection of their own to ``write_uri`` (else the
    first of ``uri``) alone, so they never land on a read-only consumer. While that
    server is down, they fail with DirectoryUnavailable.
    """

    def __init__(self, cfg: LdapConfig) -> None:
        self.cfg = cfg
        self.mapping = cfg.mapping
        self._attr_of: dict[str, str] = dict(cfg.mapping.attributes)
        self._concept_of: dict[str, str] = {a.lower(): c for c, a in self._attr_of.items()}
        self._attrlist = sorted(set(self._attr_of.values()))
        self._lock = threading.Lock()
        self._conn: ReconnectLDAPObject | None = None
        self._write_conn: ReconnectLDAPObject | None = None
        self.domain_base = cfg.mapping.domain_base.format(base_dn=cfg.base_dn)

    def bound_as(self, dn: str, password: str) -> LdapDirectory:
        """A directory like this one that binds as ``dn`` with ``password`` (a simple bind,
        checked now): slapd then applies its ACLs to every read and write as that person.

        Raises AuthenticationFailed on wrong credentials (an empty password is refused
        here: LDAP would treat it as an unauthenticated bind), DirectoryUnavailable when
        the server cannot answer.
        """
        from mailwarden.access import AuthenticationFailed

        if not dn or not password:
            raise AuthenticationFailed("login failed")
        cfg = dataclasses.replace(self.cfg, bind_dn=dn, bind_password=password, bind_password_file="")
        other = LdapDirectory(cfg)
        try:
            other._write_conn = other._connect(cfg.writer)
        except ldap.INVALID_CREDENTIALS:
            raise AuthenticationFailed("login failed") from None
        except _UNAVAILABLE as exc:
            raise DirectoryUnavailable(f"LDAP {cfg.writer}: bind: {_describe(exc)}") from None
        except OSError as exc:
            raise DirectoryUnavailable(f"LDAP {cfg.writer}: bind: {exc}") from None
        return other

    @property
    def bind_dn(self) -> str:
        """The DN this directory binds as (empty: anonymous)."""
        return self.cfg.bind_dn

    # ------------------------------------------------------------ connection

    def _connect(self, uri: str) -> ReconnectLDAPObject:
        cfg = self.cfg
        conn = ReconnectLDAPObject(
            uri, retry_max=max(cfg.retry_max, 1), retry_delay=cfg.retry_delay
        )
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
        conn.set_option(ldap.OPT_REFERRALS, 0)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, cfg.network_timeout)
        conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout)
        if cfg.ca_cert_file:
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cfg.ca_cert_file)
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        if cfg.start_tls:
            conn.start_tls_s()
        conn.simple_bind_s(cfg.bind_dn, bind_password(cfg) if cfg.bind_dn else "")
        return conn

    def _call(self, what: str, fn: Callable[[ReconnectLDAPObject], T], *, write: bool = False) -> T:
        """``fn`` on the lookup connection (``uri``, each server in turn), or with ``write``
        on the connection to ``writer`` alone: a change never goes to a consumer."""
        uri = self.cfg.writer if write else self.cfg.uri
        with self._lock:
            try:
                conn = self._write_conn if write else self._conn
                if conn is None:
                    conn = self._connect(uri)
                    if write:
                        self._write_conn = conn
                    else:
                        self._conn = conn
                return fn(conn)
            except _UNAVAILABLE as exc:
                self._drop(write=write)
                raise DirectoryUnavailable(f"LDAP {uri}: {what}: {_describe(exc)}") from None
            except OSError as exc:
                self._drop(write=write)
                raise DirectoryUnavailable(f"LDAP {uri}: {what}: {exc}") from None

    def _drop(self, *, write: bool = False) -> None:
        conn = self._write_conn if write else self._conn
        if write:
            self._write_conn = None
        else:
            self._conn = None
        if conn is not None:
            try:
                conn.unbind_s()
            except Exception:
                log.debug("unbind after error failed", exc_info=True)

    def close(self) -> None:
        """Unbind the connections."""
        with self._lock:
            self._drop()
            self._drop(write=True)

    def ping(self) -> None:
        """Read the root DSE; raise DirectoryUnavailable if the server does not answer."""
        self._call("ping", lambda c: c.search_s("", ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"]))

    # ------------------------------------------------------------ reading

    def _entry(self, dn: str, attrs: Mapping[str, Sequence[bytes]]) -> Entry:
        values: dict[str, list[str]] = {}
        problems: list[str] = []
        limit = self.cfg.max_value_length
        for attr, raw_values in attrs.items():
            concept = self._concept_of.get(attr.lower())
            if concept is None:
                continue
            for raw in raw_values:
                if len(raw) > limit:
                    problems.append(f"{dn}: {attr} value of {len(raw)} bytes ignored (limit {limit})")
                    continue
                try:
                    values.setdefault(concept, []).append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    problems.append(f"{dn}: {attr} value is not UTF-8, ignored")
        return Entry(dn=dn, values=values, problems=tuple(problems))

    def _search(self, what: str, base: str, filterstr: str, sizelimit: int = 2) -> list[Entry]:
        def run(conn: ReconnectLDAPObject) -> list[tuple[str, dict[str, list[bytes]]]]:
            try:
                result: list[Any] = conn.search_ext_s(
                    base, ldap.SCOPE_SUBTREE, filterstr, self._attrlist,
                    timeout=self.cfg.timeout, sizelimit=sizelimit,
                )
            except ldap.NO_SUCH_OBJECT:
                raise DirectoryUnavailable(
                    f"LDAP {self.cfg.uri}: {what}: search base {base!r} does not exist or is "
                    f"not visible to {self.cfg.bind_dn or 'an anonymous bind'} (check ldap.bind_dn)"
                ) from None
            except ldap.FILTER_ERROR:
                raise DirectoryUnavailable(
                    f"LDAP {self.cfg.uri}: {what}: bad filter {filterstr!r} (check ldap.mapping)"
                ) from None
            return [(dn, attrs) for dn, attrs in result if dn is not None]

        return [self._entry(dn, attrs) for dn, attrs in self._call(what, run)]

    def _unique(self, what: str, entries: list[Entry]) -> Entry | None:
        if len(entries) > 1:
            dns = ", ".join(e.dn for e in entries)
            raise DirectoryUnavailable(f"LDAP: {what} matches more than one entry: {dns}")
        return entries[0] if entries else None

    def find_domain(self, domain: str) -> Entry | None:
        """The domain entry named ``domain`` (or having it as alias)."""
        esc = ldap.filter.escape_filter_chars(domain)
        flt = self.mapping.domain_filter.format(domain=esc)
        return self._unique(f"domain {domain}", self._search(f"domain {domain}", self.domain_base, flt))

    def domains_with(self, concept: str) -> list[Entry]:
        """Every domain entry with a value for ``concept`` (``mailwarden config check --connect``)."""
        flt = f"(&{self.mapping.domain_filter.format(domain='*')}({self._attr_of[concept]}=*))"
        return self._search(f"domains with {concept}", self.domain_base, flt, sizelimit=0)

    def find_user(self, address: str, domain: Entry) -> Entry | None:
        """The subscriber entry for ``address`` below the domain's user base."""
        local, dom = split_address(address)
        esc = ldap.filter.escape_filter_chars
        flt = self.mapping.user_filter.format(address=esc(address), local=esc(local), domain=esc(dom))
        base = self.mapping.user_base.format(domain_dn=domain.dn, base_dn=self.cfg.base_dn)
        return self._unique(f"address {address}", self._search(f"address {address}", base, flt))

    def users_of(self, domain: Entry, name: str) -> list[Entry]:
        """Every subscriber entry of the domain ``name`` (its primary addresses there), for
        commands that walk a whole domain (``mailwarden migrate``)."""
        dom = ldap.filter.escape_filter_chars(name)
        flt = self.mapping.user_filter.format(address=f"*@{dom}", local="*", domain=dom)
        base = self.mapping.user_base.format(domain_dn=domain.dn, base_dn=self.cfg.base_dn)
        return self._search(f"subscribers of {name}", base, flt, sizelimit=0)

    # ------------------------------------------------------------ writing

    def modify(self, dn: str, changes: Mapping[str, Sequence[str]]) -> None:
        """Replace (or delete, with an empty list) the given concepts on ``dn``."""
        mods: list[tuple[int, str, list[bytes] | None]] = []
        for concept, vals in changes.items():
            attr = self._attr_of[concept]
            mods.append((ldap.MOD_REPLACE, attr, [v.encode("utf-8") for v in vals] or None))

        def run(conn: ReconnectLDAPObject) -> None:
            try:
                conn.modify_s(dn, mods)
            except ldap.NO_SUCH_OBJECT:
                raise NoSuchEntry(f"{dn}: no such entry") from None
            except ldap.REFERRAL:
                raise DirectoryError(
                    f"{dn}: {self.cfg.writer} is a read-only replica and refers changes elsewhere "
                    "(set ldap.write_uri to the provider)"
                ) from None
            except (ldap.INSUFFICIENT_ACCESS, ldap.STRONG_AUTH_REQUIRED):
                from mailwarden.access import ChangeRefused

                raise ChangeRefused(
                    f"{dn}: insufficient access for {self.cfg.bind_dn or 'anonymous'} "
                    "(the directory's ACLs refuse it; see ldap.bind_dn or --as)"
                ) from None
            except (
                ldap.INVALID_SYNTAX, ldap.OBJECT_CLASS_VIOLATION, ldap.UNDEFINED_TYPE,
                ldap.CONSTRAINT_VIOLATION, ldap.TYPE_OR_VALUE_EXISTS,
            ) as exc:
                raise DirectoryError(f"{dn}: {_describe(exc)}") from None

        self._call(f"modify {dn}", run, write=True)

    # ------------------------------------------------------------ administration

    def search_users(self, text: str = "", domain: Entry | None = None, limit: int = 100) -> list[Entry]:
        """Subscribers whose address or alias contains ``text`` (all for an empty one), below
        ``domain`` or every domain, as far as this bind may see them: the first ``limit``
        the server returns, sorted by address.  The mapping's ``user_filter`` is used with
        a substring pattern, so a site's own attributes work too."""
        esc = ldap.filter.escape_filter_chars(text.strip().lower())
        pattern = f"*{esc}*" if esc else "*"
        flt = self.mapping.user_filter.format(address=pattern, local=pattern, domain="*")
        base = (self.mapping.user_base.format(domain_dn=domain.dn, base_dn=self.cfg.base_dn)
                if domain is not None else self.domain_base)

        def run(conn: ReconnectLDAPObject) -> list[tuple[str, dict[str, list[bytes]]]]:
            found: list[tuple[str, dict[str, list[bytes]]]] = []
            try:
                msgid = conn.search_ext(base, ldap.SCOPE_SUBTREE, flt, self._attrlist,
                                        sizelimit=max(limit, 0))
                while True:
                    rtype, rdata, *_ = conn.result3(msgid, all=0, timeout=self.cfg.timeout)
                    if rtype == ldap.RES_SEARCH_RESULT:
                        break
                    found += [(d, a) for d, a in rdata if d is not None]
            except ldap.SIZELIMIT_EXCEEDED:
                pass  # the first ``limit`` are what was asked for
            except ldap.NO_SUCH_OBJECT:
                return []
            return found

        entries = [self._entry(dn, attrs) for dn, attrs in self._call(f"user search {text!r}", run)]
        return sorted(entries, key=lambda e: (e.first("mail") or e.dn).lower())

    def read_entry(self, dn: str) -> Entry:
        """The entry ``dn`` by concept, read from the provider (``write_uri``) so that a
        change's old values are the ones it replaces; NoSuchEntry if it does not exist
        or this bind may not see it."""

        def run(conn: ReconnectLDAPObject) -> list[tuple[str, dict[str, list[bytes]]]]:
            try:
                result: list[Any] = conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)",
                                                      self._attrlist, timeout=self.cfg.timeout)
            except ldap.NO_SUCH_OBJECT:
                return []
            return [(d, a) for d, a in result if d is not None]

        found = self._call(f"read {dn}", run, write=True)
        if not found:
            raise NoSuchEntry(f"{dn}: no such entry (or not visible to {self.bind_dn or 'anonymous'})")
        return self._entry(*found[0])

    def search_raw(self, base: str, filterstr: str, attrs: Sequence[str], *,
                   scope: int = ldap.SCOPE_SUBTREE, sizelimit: int = 0,
                   write: bool = False) -> list[tuple[str, dict[str, list[str]]]]:
        """Entries below ``base`` matching ``filterstr`` with ``attrs`` under their LDAP names
        (values decoded as UTF-8), for administration (logins, groups, audit records).
        A missing base gives an empty list; ``write`` asks the provider."""

        def run(conn: ReconnectLDAPObject) -> list[tuple[str, dict[str, list[str]]]]:
            try:
                result: list[Any] = conn.search_ext_s(base, scope, filterstr, list(attrs),
                                                      timeout=self.cfg.timeout, sizelimit=sizelimit)
            except ldap.NO_SUCH_OBJECT:
                return []
            return [(d, {k: [v.decode("utf-8", "replace") for v in vs] for k, vs in a.items()})
                    for d, a in result if d is not None]

        return self._call(f"search {base}", run, write=write)

    def add_raw(self, dn: str, attrs: Mapping[str, Sequence[str]]) -> None:
        """Add the entry ``dn`` with ``attrs`` (LDAP names) on the provider; DirectoryError
        when refused (ChangeRefused for insufficient access, NoSuchEntry when the parent
        is missing)."""
        from mailwarden.access import ChangeRefused

        modlist = [(a, [v.encode("utf-8") for v in vals]) for a, vals in attrs.items()]

        def run(conn: ReconnectLDAPObject) -> None:
            try:
                conn.add_s(dn, modlist)
            except ldap.INSUFFICIENT_ACCESS:
                raise ChangeRefused(f"{dn}: {self.bind_dn or 'anonymous'} may not add it") from None
            except ldap.NO_SUCH_OBJECT:
                raise NoSuchEntry(f"{dn}: its parent entry does not exist") from None
            except (ldap.ALREADY_EXISTS, ldap.INVALID_SYNTAX,
                    ldap.OBJECT_CLASS_VIOLATION, ldap.UNDEFINED_TYPE, ldap.CONSTRAINT_VIOLATION,
                    ldap.NAMING_VIOLATION) as exc:
                raise DirectoryError(f"{dn}: {_describe(exc)}") from None

        self._call(f"add {dn}", run, write=True)
