"""In-memory fakes of mailwarden's outside systems, for fast unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mailwarden.address import split_address
from mailwarden.directory import DirectoryUnavailable, Entry, NoSuchEntry


class FakeDirectory:
    """A Directory held in dictionaries; entries are keyed by concept, like the LDAP adapter's.

    ``down = True`` makes every call raise DirectoryUnavailable; ``calls`` counts lookups.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, list[str]]] = {}
        self.down = False
        self.calls = 0

    def add_domain(self, name: str, **values: Sequence[str] | str) -> str:
        """Add a domain entry; returns its DN."""
        dn = f"mwDomainName={name},ou=domains"
        self.entries[dn] = {"domain_name": [name], **_lists(values)}
        return dn

    def add_user(self, address: str, **values: Sequence[str] | str) -> str:
        """Add a subscriber entry below its domain; returns its DN."""
        local, domain = split_address(address)
        dn = f"uid={local},mwDomainName={domain},ou=domains"
        self.entries[dn] = {"mail": [address], **_lists(values)}
        return dn

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise DirectoryUnavailable("fake directory is down")

    def find_domain(self, domain: str) -> Entry | None:
        """The domain entry with this name or alias."""
        self._check()
        for dn, vals in self.entries.items():
            names = vals.get("domain_name", []) + vals.get("domain_alias", [])
            if domain in (n.lower() for n in names):
                return Entry(dn, vals)
        return None

    def domains_with(self, concept: str) -> list[Entry]:
        """Every domain entry with a value for ``concept``."""
        self._check()
        return [Entry(dn, vals) for dn, vals in self.entries.items()
                if "domain_name" in vals and vals.get(concept)]

    def find_user(self, address: str, domain: Entry) -> Entry | None:
        """The subscriber below ``domain`` with this primary or alternate address."""
        self._check()
        found = [
            Entry(dn, vals)
            for dn, vals in self.entries.items()
            if dn.endswith("," + domain.dn)
            and address in (a.lower() for a in vals.get("mail", []) + vals.get("alternate_address", []))
        ]
        if len(found) > 1:
            raise DirectoryUnavailable(f"address {address} matches more than one entry")
        return found[0] if found else None

    def users_of(self, domain: Entry, name: str) -> list[Entry]:
        """Every subscriber entry below ``domain``."""
        self._check()
        return [Entry(dn, vals) for dn, vals in self.entries.items()
                if dn.endswith("," + domain.dn) and "mail" in vals]

    def modify(self, dn: str, changes: Mapping[str, Sequence[str]]) -> None:
        """Replace or delete concepts on an entry."""
        self._check()
        if dn not in self.entries:
            raise NoSuchEntry(f"{dn}: no such entry")
        for concept, vals in changes.items():
            if vals:
                self.entries[dn][concept] = list(vals)
            else:
                self.entries[dn].pop(concept, None)

    def ping(self) -> None:
        """Raise when down."""
        self._check()


def _lists(values: Mapping[str, Sequence[str] | str]) -> dict[str, list[str]]:
    return {k: [v] if isinstance(v, str) else list(v) for k, v in values.items()}
