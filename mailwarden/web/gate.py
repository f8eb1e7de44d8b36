"""The console's way into the directory: logging in, binding as the person, listing, writing.

:class:`LdapGate` is the real one: :func:`mailwarden.access.authenticate` with the
configured (read-only service) bind finds the person and their role, and every request
then works through ``LdapDirectory.bound_as`` the person, so slapd's ACLs decide every
read and write; writes go through :func:`mailwarden.access.apply_change`, the one write
path, which also writes the audit record.  Tests of the console's own mechanics (CSRF,
sessions, throttling) hand in a fake gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mailwarden.access import Person
from mailwarden.directory import Directory, Entry

if TYPE_CHECKING:
    from mailwarden.config import Config


@dataclass(frozen=True)
class Listed:
    """A user in a list: entry DN and primary address."""

    dn: str
    address: str


class Gate(Protocol):
    """What the console needs from the directory beyond :class:`Directory`."""

    def authenticate(self, login: str, password: str) -> Person:
        """The person, or AuthenticationFailed / DirectoryUnavailable."""
        ...

    def bind(self, person: Person, password: str) -> Directory:
        """A directory bound as ``person`` (AuthenticationFailed when the password changed)."""
        ...

    def domains(self, directory: Directory) -> list[str]:
        """The domains ``directory``'s bind may see, by name."""
        ...

    def users(self, directory: Directory, domain: Entry | None, text: str, limit: int) -> list[Listed]:
        """Subscribers ``directory``'s bind may see (below ``domain`` when given) whose address
        contains ``text``."""
        ...

    def write(self, directory: Directory, person: Person, dn: str, changes: Mapping[str, Sequence[str]],
              client: str) -> None:
        """Change ``dn`` as ``person`` (ChangeRefused / DirectoryError when refused)."""
        ...


class LdapGate:
    """The gate of a real LDAP directory."""

    def __init__(self, config: Config) -> None:
        from mailwarden.ldapdir import LdapDirectory

        self.config = config
        self.service = LdapDirectory(config.ldap)

    def authenticate(self, login: str, password: str) -> Person:
        """Find and verify the person with the service bind."""
        from mailwarden.access import authenticate

        return authenticate(self.service, login, password)

    def bind(self, person: Person, password: str) -> Directory:
        """The person's own bind."""
        return self.service.bound_as(person.dn, password)

    def domains(self, directory: Directory) -> list[str]:
        """Domain names below the domain base (what the bind may read)."""
        d = self._ldap(directory)
        attr = d.mapping.attributes["domain_name"]
        rows = d.search_raw(d.domain_base, d.mapping.domain_filter.format(domain="*"), [attr])
        return sorted(v.lower() for _, attrs in rows for k, vs in attrs.items() if k.lower() == attr.lower()
                      for v in vs[:1])

    def users(self, directory: Directory, domain: Entry | None, text: str, limit: int) -> list[Listed]:
        """Subscribers by address (``mail`` or alternate address contains ``text``)."""
        import ldap.filter

        d = self._ldap(directory)
        attrs = d.mapping.attributes
        mail, alt = attrs["mail"], attrs["alternate_address"]
        esc = ldap.filter.escape_filter_chars(text.strip().lower())
        wanted = f"(|({mail}=*{esc}*)({alt}=*{esc}*))" if esc else f"({mail}=*)"
        flt = f"(&{d.mapping.user_filter.format(address='*', local='*', domain='*')}{wanted})"
        base = (d.mapping.user_base.format(domain_dn=domain.dn, base_dn=d.cfg.base_dn) if domain
                else d.cfg.base_dn)
        # A server-side size limit would end the search with an error: cut here instead.
        rows = d.search_raw(base, flt, [mail])[:limit]
        out = []
        for dn, values in rows:
            found = next((vs[0] for k, vs in values.items() if k.lower() == mail.lower() and vs), "")
            if found:
                out.append(Listed(dn, found.lower()))
        return sorted(out, key=lambda u: u.address)

    def write(self, directory: Directory, person: Person, dn: str, changes: Mapping[str, Sequence[str]],
              client: str) -> None:
        """Through the one write path (audit record included)."""
        from mailwarden.access import apply_change, web_origin

        apply_change(self._ldap(directory), dn, changes, actor=person, origin=web_origin(client))

    @staticmethod
    def _ldap(directory: Directory) -> Any:
        from mailwarden.ldapdir import LdapDirectory

        if not isinstance(directory, LdapDirectory):  # pragma: no cover - wiring error
            raise TypeError(f"LdapGate needs an LdapDirectory, not {type(directory).__name__}")
        return directory
