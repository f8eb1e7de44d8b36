"""The subscriber directory interface.

A directory finds domain and subscriber entries and returns their attributes
keyed by *concept* name (``spam_threshold``, ``alternate_address`` …), already
translated from whatever the site's LDAP calls them.  The LDAP adapter lives in
``mailwarden.ldapdir``; a fake for tests, ``FakeDirectory``, in ``harness/fakes.py``
(the repository's test harness, which is not installed with the package).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (down, timing out, misconfigured, ambiguous data).

    Callers turn this into a temporary failure; it is never a reason to skip a check.
    """


class DirectoryError(Exception):
    """A write or lookup the directory refused for a reason the operator can fix."""


class NoSuchEntry(DirectoryError):
    """The domain or subscriber does not exist."""


@dataclass(frozen=True)
class Entry:
    """A directory entry: its DN and raw string values keyed by concept name."""

    dn: str
    values: Mapping[str, Sequence[str]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    """Values the adapter had to drop (undecodable, oversized), for display."""

    def first(self, concept: str) -> str | None:
        """The first value of a concept, or None."""
        vals = self.values.get(concept)
        return vals[0] if vals else None

    def all(self, concept: str) -> list[str]:
        """Every value of a concept."""
        return list(self.values.get(concept, ()))


class Directory(Protocol):
    """What the policy resolver and the CLI need from a directory."""

    def find_domain(self, domain: str) -> Entry | None:
        """The entry of the domain that has ``domain`` as name or alias, or None."""
        ...

    def find_user(self, address: str, domain: Entry) -> Entry | None:
        """The subscriber with ``address`` as primary or alternate address, or None.

        Raises DirectoryUnavailable when several entries claim the address.
        """
        ...

    def domains_with(self, concept: str) -> list[Entry]:
        """Every domain entry with a value of its own for ``concept``."""
        ...

    def modify(self, dn: str, changes: Mapping[str, Sequence[str]]) -> None:
        """Replace the values of concepts on ``dn``; an empty sequence deletes them."""
        ...

    def ping(self) -> None:
        """Raise DirectoryUnavailable unless the directory answers."""
        ...
