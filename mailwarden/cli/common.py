"""What every ``mailwarden`` command shares: the lazily built App, error handling, exit codes
and the printed effective policy.  Daemons' command groups import from here; nothing
here imports a command module.

Exit codes follow sysexits: 1 no such entry or refused change, 2 usage / bad value,
75 (EX_TEMPFAIL) directory or store unavailable, 77 (EX_NOPERM) login failed,
78 (EX_CONFIG) bad configuration.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from mailwarden import catalogue
from mailwarden.address import InvalidAddress
from mailwarden.config import Config, ConfigError, load_config
from mailwarden.directory import Directory, DirectoryError, DirectoryUnavailable, NoSuchEntry
from mailwarden.log import setup_logging
from mailwarden.policy import AddressKind, EffectivePolicy, PolicyResolver

if TYPE_CHECKING:
    from mailwarden.access import ChangeLine, Person
    from mailwarden.ldapdir import LdapDirectory

P = ParamSpec("P")
R = TypeVar("R")

EX_NOTFOUND = 1
EX_USAGE = 2
EX_NOPERM = 77
EX_TEMPFAIL = 75
EX_CONFIG = 78


def fail(message: str, code: int) -> NoReturn:
    """Print ``mailwarden: message`` to stderr and exit."""
    click.echo(f"mailwarden: {message}", err=True)
    sys.exit(code)


@dataclass
class App:
    """Lazily built configuration, directory and resolver for one command."""

    config_file: str | None
    as_login: str | None = None
    """``--as``: act as this person (bound with their own credentials), not the operator."""
    password_file: str | None = None
    _config: Config | None = None
    _directory: Directory | None = None
    _resolver: PolicyResolver | None = field(default=None, repr=False)
    person: Person | None = None
    """The person acting (``--as``), once the directory is bound; None for the operator."""

    @property
    def config(self) -> Config:
        """The loaded configuration (exits 78 on error)."""
        if self._config is None:
            try:
                self._config = load_config(self.config_file)
            except ConfigError as exc:
                fail("configuration error:\n" + str(exc), EX_CONFIG)
            setup_logging(self._config.general, "cli")
        return self._config

    @property
    def directory(self) -> Directory:
        """The LDAP directory from the configuration, bound as ``ldap.bind_dn`` (the
        operator) or, with ``--as``, as that person after checking their password."""
        return self.ldap

    @property
    def ldap(self) -> LdapDirectory:
        """:attr:`directory` as the LDAP adapter (logins, changes, the audit log)."""
        from mailwarden.ldapdir import LdapDirectory

        if self._directory is None:
            operator = LdapDirectory(self.config.ldap)
            if self.as_login is None:
                self._directory = operator
            else:
                self._directory = self._login(operator, self.as_login)
        assert isinstance(self._directory, LdapDirectory)
        return self._directory

    def _login(self, operator: LdapDirectory, login: str) -> LdapDirectory:
        from mailwarden.access import AuthenticationFailed, authenticate

        if self.password_file:
            try:
                password = Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                fail(f"--password-file: {exc}", EX_USAGE)
        else:
            password = click.prompt(f"password for {login}", hide_input=True, err=True)
        try:
            self.person = authenticate(operator, login, password)
            return operator.bound_as(self.person.dn, password)
        except AuthenticationFailed:
            fail(f"login as {login} failed (unknown login, wrong password or no role)", EX_NOPERM)
        except DirectoryUnavailable as exc:
            fail(f"directory unavailable: {exc}", EX_TEMPFAIL)
        finally:
            operator.close()

    def change(self, dn: str, changes: Mapping[str, Sequence[str]]) -> list[ChangeLine]:
        """Make a change through the one audited write path, as the acting person."""
        from mailwarden.access import apply_change, cli_origin

        directory = self.ldap
        return apply_change(directory, dn, changes, actor=self.person, origin=cli_origin())

    @property
    def resolver(self) -> PolicyResolver:
        """A resolver without caching (each command asks once)."""
        if self._resolver is None:
            self._resolver = PolicyResolver(self.directory, self.config)
        return self._resolver


@dataclass(frozen=True)
class PlannedChange:
    """One subscriber's change in a bulk import, with the input line it came from."""

    line: int
    subscriber: str
    dn: str
    changes: Mapping[str, Sequence[str]]


def write_planned(app: App, planned: Sequence[PlannedChange], *, errors: Sequence[str], dry_run: bool,
                  unchanged: int | None = None) -> None:
    """The end of a bulk import, checked first: with any error nothing is written; a dry
    run only counts; else each change goes through the audited write path as the acting
    person, a refused one is reported and the others go on (exit 1 if any was refused)."""
    for error in errors:
        click.echo(f"error: {error}", err=True)
    if errors:
        fail(f"{len(errors)} line(s) with errors; nothing written", EX_USAGE)
    same = "" if unchanged is None else f", {unchanged} unchanged"
    if dry_run:
        click.echo(f"dry run: {len(planned)} subscriber(s) would change{same}; nothing written")
        return
    refused = written = 0
    for change in planned:
        try:
            written += bool(app.change(change.dn, change.changes))
        except DirectoryError as exc:
            refused += 1
            click.echo(f"error: line {change.line}: {change.subscriber}: {exc}", err=True)
    click.echo(f"{written} subscriber(s) changed{same}, {refused} refused")
    if refused:
        sys.exit(EX_NOTFOUND)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the core's exceptions into one clear line and a sysexits code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DirectoryUnavailable as exc:
            fail(f"directory unavailable: {exc}", EX_TEMPFAIL)
        except NoSuchEntry as exc:
            fail(str(exc), EX_NOTFOUND)
        except DirectoryError as exc:
            fail(f"directory refused the change: {exc}", EX_NOTFOUND)
        except (InvalidAddress, catalogue.InvalidValue) as exc:
            fail(str(exc), EX_USAGE)

    return wrapper


pass_app = click.make_pass_decorator(App)


def policy_as_dict(policy: EffectivePolicy) -> dict[str, Any]:
    """A JSON-ready view of an effective policy."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, catalogue.KeywordRule):
            return str(value)
        return value

    return {
        "address": policy.address,
        "kind": policy.kind.value,
        "canonical": policy.canonical,
        "domain": policy.domain,
        "active": policy.active,
        "resolved_via": list(policy.resolved_via),
        "domain_dn": policy.domain_dn,
        "user_dn": policy.user_dn,
        "alternate_addresses": list(policy.alternate_addresses),
        "domain_aliases": list(policy.domain_aliases),
        "services": {
            s.value: {"on": v.value, "source": v.source_text}
            for s, v in policy.services.items()
        },
        "settings": {
            n: {"value": plain(v.value), "source": v.source_text}
            for n, v in policy.settings.items()
        },
        "problems": list(policy.problems),
    }


def show_value(value: Any) -> str:
    """A setting value as the CLI and the console show it."""
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) if value else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value == "":
        return "-"
    return str(value)


def print_policy(policy: EffectivePolicy) -> None:
    """Human-readable effective policy with the source of every value."""
    state = {True: "active", False: "INACTIVE"}[policy.active] if policy.user_dn else ""
    click.echo(f"{policy.address}: {policy.kind.value}" + (f" ({state})" if state else ""))
    rows = [
        ("delivered to" if policy.kind is AddressKind.ROLE else "canonical", policy.canonical),
        ("domain", f"{policy.domain}  [{policy.domain_dn}]" if policy.domain else None),
        ("entry", policy.user_dn),
        ("resolved via", "; ".join(policy.resolved_via) or None),
        ("aliases", ", ".join(policy.alternate_addresses) or None),
        ("domain aliases", ", ".join(policy.domain_aliases) or None),
    ]
    for label, value in rows:
        if value:
            click.echo(f"  {label:<15} {value}")
    if not policy.is_local:
        click.echo("  (domain not hosted here: no services apply)")
        return
    click.echo("services:")
    for service, sv in policy.services.items():
        click.echo(f"  {service.value:<22} {'on' if sv.value else 'off':<4} from {sv.source_text}")
    click.echo("settings:")
    for name, sv in policy.settings.items():
        click.echo(f"  {name:<22} {show_value(sv.value):<30} from {sv.source_text}")
    if policy.problems:
        click.echo("problems:")
        for p in policy.problems:
            click.echo(f"  {p}")
