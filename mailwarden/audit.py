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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailwarden.access import ChangeLine
    from mailwarden.ldapdir import LdapDirectory


class AuditError(Exception):
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
    raise NotImplementedError


def read(directory: LdapDirectory, *, domain: str | None = None, since: datetime | None = None,
         limit: int = 1000) -> list[AuditRecord]:
    """The records ``directory``'s bind may read, oldest first: of ``domain`` only when
    given, from ``since`` on when given, at most ``limit`` (the newest ones)."""
    raise NotImplementedError
