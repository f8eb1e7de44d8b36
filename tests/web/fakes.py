"""A fake gate for the console's own mechanics (CSRF, sessions, throttling): people with
passwords, a FakeDirectory as everyone's bind, writes recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from harness.fakes import FakeDirectory
from mailwarden.access import AuthenticationFailed, Person, Role
from mailwarden.directory import Directory, Entry
from mailwarden.web.gate import Listed


@dataclass
class FakeGate:
    """People by login with their passwords; every bind is the one FakeDirectory."""

    directory: FakeDirectory = field(default_factory=FakeDirectory)
    people: dict[str, tuple[Person, str]] = field(default_factory=dict)
    writes: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    attempts: int = 0

    def add(self, login: str, password: str, role: Role, **kw: object) -> Person:
        person = Person(login=login, dn=f"uid={login},ou=people", role=role, **kw)  # type: ignore[arg-type]
        self.people[login] = (person, password)
        return person

    def authenticate(self, login: str, password: str) -> Person:
        self.attempts += 1
        found = self.people.get(login)
        if found is None or found[1] != password:
            raise AuthenticationFailed("login failed")
        return found[0]

    def bind(self, person: Person, password: str) -> Directory:
        if self.people.get(person.login, (None, None))[1] != password:
            raise AuthenticationFailed("login failed")
        return self.directory

    def domains(self, directory: Directory) -> list[str]:
        return sorted(v["domain_name"][0] for v in self.directory.entries.values() if "domain_name" in v)

    def users(self, directory: Directory, domain: Entry | None, text: str, limit: int) -> list[Listed]:
        return [Listed(dn, v["mail"][0]) for dn, v in self.directory.entries.items()
                if "mail" in v and text in v["mail"][0]][:limit]

    def write(self, directory: Directory, person: Person, dn: str, changes: Mapping[str, Sequence[str]],
              client: str) -> None:
        self.writes.append((person.login, dn, {k: list(v) for k, v in changes.items()}))
        directory.modify(dn, changes)
