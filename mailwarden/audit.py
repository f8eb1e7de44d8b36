"""The audit log: who changed what, the old and new values, when and from where.

Records are directory entries (class ``mwAuditRecord``) in ``ou=audit`` below the
domain the changed entry belongs to (``ou=audit,<base_dn>`` for anything outside a
domain).  Keeping them in the directory means the shipped ACLs decide who reads them
with the same rules as the data: a domain's administrators read their domain's
records, helpdesk and system administrators read all; whoever may change an entry may
*add* a record but nobody except a system administrator may modify or delete one.
The writer's identity is not taken on trust: slapd stamps every record with
``creatorsName`` (the DN that bound) and ``createTimestamp``, which nobody can forge;
``mwAuditActor`` (the login) and ``mwAuditOrigin`` (``cli user@host`` / ``web ADDRESS``,
which slapd cannot know) come from the writer.  slapo-accesslog was the alternative: it
records old values and the authorization identity of every change, also one made with
ldapmodify, but not the client address, and lives in a second database whose reads
cannot be split by domain with the same ACL rules.

:func:`record` is called by :func:`mailwarden.access.apply_change` only.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mailwarden.access import ChangeLine, domain_of
from mailwarden.directory import DirectoryError, DirectoryUnavailable, NoSuchEntry

if TYPE_CHECKING:
    from mailwarden.ldapdir import LdapDirectory

log = logging.getLogger("mailwarden.audit")

AUDIT_OU = "ou=audit,{parent_dn}"
_ATTRS = ("mwAuditId", "mwAuditActor", "mwAuditOrigin", "mwAuditTarget", "mwAuditDomain",
          "mwAuditChange", "mwAuditTime", "creatorsName")
_TIME = "%Y%m%d%H%M%S.%fZ"


class AuditError(DirectoryError):
    """The change was made but its record could not be written (the record is logged)."""


@dataclass(frozen=True)
class AuditRecord:
    """One change as recorded: ``creator`` is the DN slapd saw bound, ``actor`` the login."""

    dn: str
    when: datetime
    creator: str
    actor: str
    origin: str
    target: str
    domain: str | None
    changes: tuple[ChangeLine, ...]


def record(directory: LdapDirectory, *, actor: str, origin: str, target: str,
           changes: Sequence[ChangeLine]) -> AuditRecord:
    """Write one record of ``changes`` to ``target`` through ``directory`` (bound as the
    person who made them); raise AuditError if it cannot be written."""
    now = datetime.now(UTC)
    domain, domain_dn = domain_of(target)
    parent = AUDIT_OU.format(parent_dn=domain_dn or directory.cfg.base_dn)
    rid = f"{now.strftime(_TIME)}-{secrets.token_hex(4)}"
    attrs = {
        "objectClass": ["mwAuditRecord"],
        "mwAuditId": [rid],
        "mwAuditActor": [actor],
        "mwAuditOrigin": [origin],
        "mwAuditTarget": [target],
        "mwAuditTime": [now.strftime(_TIME)],
        "mwAuditChange": [_change_json(c) for c in changes],
    }
    if domain:
        attrs["mwAuditDomain"] = [domain]
    dn = f"mwAuditId={rid},{parent}"
    try:
        try:
            directory.add_raw(dn, attrs)
        except NoSuchEntry:
            # A domain created without its audit container: whoever may change the
            # domain's entries may add it (the shipped ACLs), then the record.
            directory.add_raw(parent, {"objectClass": ["organizationalUnit"], "ou": ["audit"]})
            directory.add_raw(dn, attrs)
    except (DirectoryError, DirectoryUnavailable) as exc:
        log.error("audit record not written (%s): %s changed %s from %s: %s", exc, actor, target,
                  origin, "; ".join(_change_json(c) for c in changes))
        raise AuditError(f"the change to {target} was made but its audit record could not be "
                         f"written: {exc}") from None
    return AuditRecord(dn=dn, when=now, creator=directory.bind_dn, actor=actor, origin=origin,
                       target=target, domain=domain, changes=tuple(changes))


SECRET_CONCEPTS = frozenset({"legacy_password"})
"""Concepts whose values the audit log shows by their ``{SCHEME}`` only: audit records are
readable by the domain's administrators, the hashes only by the daemons' account."""


def _shown(name: str, values: Sequence[str]) -> list[str]:
    if name not in SECRET_CONCEPTS:
        return list(values)
    return [(v[: v.index("}") + 1] if v.startswith("{") and "}" in v else "") + "(hash withheld)"
            for v in values]


def _change_json(change: ChangeLine) -> str:
    return json.dumps({"name": change.name, "old": _shown(change.name, change.old),
                       "new": _shown(change.name, change.new)},
                      ensure_ascii=False, sort_keys=True)


def _parse_time(text: str) -> datetime:
    for fmt in (_TIME, "%Y%m%d%H%M%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return datetime.fromtimestamp(0, UTC)


def _parse_change(text: str) -> ChangeLine:
    try:
        data = json.loads(text)
        return ChangeLine(str(data["name"]), tuple(map(str, data["old"])),
                          tuple(map(str, data["new"])))
    except (ValueError, KeyError, TypeError):
        return ChangeLine("?", (), (text,))


def read(directory: LdapDirectory, *, domain: str | None = None, since: datetime | None = None,
         limit: int = 1000) -> list[AuditRecord]:
    """The records ``directory``'s bind may read, oldest first: of ``domain`` only when
    given, from ``since`` on when given, at most ``limit`` (the newest ones).
    NoSuchEntry when ``domain`` is not there (or not visible to this bind)."""
    if domain:
        entry = directory.find_domain(domain)
        if entry is None:
            raise NoSuchEntry(f"no such domain {domain} (or not visible to "
                              f"{directory.bind_dn or 'anonymous'})")
        base = AUDIT_OU.format(parent_dn=entry.dn)
    else:
        base = directory.cfg.base_dn
    flt = "(objectClass=mwAuditRecord)"
    if since is not None:
        stamp = since.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")
        flt = f"(&{flt}(mwAuditTime>={stamp}))"
    found = directory.search_raw(base, flt, _ATTRS)
    records = []
    for dn, attrs in found:
        def one(name: str, a: dict[str, list[str]] = attrs) -> str:
            return next(iter(a.get(name, [])), "")
        records.append(AuditRecord(
            dn=dn, when=_parse_time(one("mwAuditTime")), creator=one("creatorsName"),
            actor=one("mwAuditActor"), origin=one("mwAuditOrigin"), target=one("mwAuditTarget"),
            domain=one("mwAuditDomain") or None,
            changes=tuple(_parse_change(c) for c in attrs.get("mwAuditChange", [])),
        ))
    records.sort(key=lambda r: (r.when, r.dn))
    return records[-limit:] if limit > 0 else records
