"""``mailwarden domain ...`` / ``mailwarden user ...``: show and change entries in LDAP.

Both groups are built by one factory: they differ only in how the entry is found
and which settings are allowed on it (a setting's scope).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from mailwarden import catalogue
from mailwarden.access import service_changes
from mailwarden.address import InvalidAddress, normalize_address, normalize_domain
from mailwarden.catalogue import Service
from mailwarden.cli.common import (
    EX_USAGE,
    App,
    PlannedChange,
    fail,
    handle_errors,
    pass_app,
    print_policy,
    write_planned,
)
from mailwarden.directory import Entry, NoSuchEntry
from mailwarden.policy import AddressKind, EffectivePolicy


@dataclass(frozen=True)
class Target:
    """The entry a command acts on and an address whose policy shows the result."""

    entry: Entry
    probe: str
    layer: str


def _find_domain(app: App, name: str) -> Target:
    domain = normalize_domain(name)
    entry = app.directory.find_domain(domain)
    if entry is None:
        raise NoSuchEntry(f"no such domain {domain}")
    return Target(entry, (entry.first("domain_name") or domain).lower(), "domain")


def _find_user(app: App, address: str) -> Target:
    addr = normalize_address(address)
    policy = app.resolver.effective_policy(addr)
    if policy.kind is not AddressKind.SUBSCRIBER or policy.user_dn is None:
        where = "no such domain" if policy.kind is AddressKind.NOT_LOCAL else "no such user"
        raise NoSuchEntry(f"{where}: {addr}")
    assert policy.domain is not None
    domain = app.directory.find_domain(policy.domain)
    user = app.directory.find_user(policy.canonical or addr, domain) if domain else None
    if user is None:  # pragma: no cover - vanished between two lookups
        raise NoSuchEntry(f"no such user: {addr}")
    return Target(user, policy.canonical or addr, "user")


def _show(app: App, target: Target) -> EffectivePolicy:
    """The policy as it is now in the directory (the domain's own layer for a domain)."""
    app.resolver.invalidate()
    if target.layer == "user":
        return app.resolver.effective_policy(target.probe)
    domain = app.directory.find_domain(target.probe)
    if domain is None:  # pragma: no cover - vanished between two lookups
        raise NoSuchEntry(f"no such domain {target.probe}")
    return dataclasses.replace(
        app.resolver.build(target.probe, domain, None), kind=AddressKind.DOMAIN
    )


def _service_change(app: App, target: Target, services: list[Service], action: str) -> None:
    app.change(target.entry.dn, _service_changes(app, target, [(s, action) for s in services]))


def _service_changes(app: App, target: Target, actions: list[tuple[Service, str]]) -> dict[str, list[str]]:
    """The new service attribute values after each (service, enable|disable|inherit)."""
    try:
        return service_changes(app.config.ldap.mapping, target.entry, lambda: _show(app, target), actions)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _parse_services(names: tuple[str, ...]) -> list[Service]:
    try:
        return [Service.parse(n) for n in names]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _setting(name: str, layer: str) -> catalogue.SettingSpec:
    spec = catalogue.SETTINGS.get(name.replace("-", "_"))
    if spec is None:
        raise click.BadParameter(
            f"unknown setting {name!r} (see `mailwarden services`)", param_hint="SETTING"
        )
    if spec.scope not in ("both", layer):
        raise click.BadParameter(f"{spec.name} is a {spec.scope} setting, not a {layer} one")
    return spec


def _report(app: App, target: Target, names: list[str]) -> None:
    policy = _show(app, target)
    for name in names:
        if name in policy.settings:
            sv = policy.settings[name]
            value = ", ".join(map(str, sv.value)) if isinstance(sv.value, tuple) else sv.value
            click.echo(f"{target.entry.dn}: {name} = {value} (from {sv.source_text})")
        else:
            sv = policy.services[Service(name)]
            click.echo(f"{target.entry.dn}: {name} {'on' if sv.value else 'off'} (from {sv.source_text})")


def make_group(name: str, key: str, locate: Callable[[App, str], Target], layer: str) -> click.Group:
    """``mailwarden NAME show|enable|disable|inherit|set|unset``."""

    @click.group(name, help=f"Show and change a {name}'s services and settings in LDAP.")
    def group() -> None:
        pass

    @group.command("show", help=f"Show the {name}'s effective policy with sources.")
    @click.argument(key)
    @pass_app
    @handle_errors
    def show(app: App, /, **kw: str) -> None:
        print_policy(_show(app, locate(app, kw[key.lower()])))

    for action, doc in (
        ("enable", "Switch services on here."),
        ("disable", "Switch services off here (overriding the domain)."),
        ("inherit", "Drop this entry's own on/off for services (inherit them)."),
    ):

        @group.command(action, help=doc)
        @click.argument(key)
        @click.argument("services", nargs=-1, required=True)
        @pass_app
        @handle_errors
        def toggle(app: App, /, services: tuple[str, ...], _action: str = action, **kw: str) -> None:
            target = locate(app, kw[key.lower()])
            parsed = _parse_services(services)
            _service_change(app, target, parsed, _action)
            _report(app, target, [s.value for s in parsed])

    @group.command("set", help="Set a setting (several VALUEs for a list setting).")
    @click.argument(key)
    @click.argument("setting")
    @click.argument("values", nargs=-1, required=True)
    @pass_app
    @handle_errors
    def set_(app: App, /, setting: str, values: tuple[str, ...], **kw: str) -> None:
        spec = _setting(setting, layer)
        target = locate(app, kw[key.lower()])
        parsed = spec.parse(list(values))
        app.change(target.entry.dn, {spec.name: spec.format(parsed)})
        _report(app, target, [spec.name])

    @group.command("unset", help="Remove a setting so the value is inherited.")
    @click.argument(key)
    @click.argument("setting")
    @pass_app
    @handle_errors
    def unset(app: App, /, setting: str, **kw: str) -> None:
        spec = _setting(setting, layer)
        target = locate(app, kw[key.lower()])
        app.change(target.entry.dn, {spec.name: []})
        _report(app, target, [spec.name])

    _ = (show, set_, unset)
    return group


domain_group = make_group("domain", "DOMAIN", _find_domain, "domain")
user_group = make_group("user", "ADDRESS", _find_user, "user")


@click.group("ldap")
def ldap_group() -> None:
    """The shipped LDAP schema and synthetic directory data."""


@ldap_group.command("schema")
def ldap_schema() -> None:
    """Print the cn=config schema LDIF (load with ldapadd -Y EXTERNAL -H ldapi:///)."""
    from mailwarden.schema import schema_ldif

    click.echo(schema_ldif(), nl=False)


@ldap_group.command("acl")
@click.option("--base-dn", default="dc=mailwarden,dc=test", show_default=True,
              help="Base DN of the mail tree.")
@click.option("--database", default="olcDatabase={1}mdb,cn=config", show_default=True,
              help="The cn=config entry of the database holding it.")
def ldap_acl(base_dn: str, database: str) -> None:
    """Print the slapd access rules generated from the catalogue, as an LDIF change
    (load with ldapmodify -Y EXTERNAL -H ldapi:///)."""
    from mailwarden.acl import acl_ldif

    click.echo(acl_ldif(base_dn, database), nl=False)


@ldap_group.command("generate")
@click.option("--subscribers", "-n", default=1000, show_default=True, help="How many users.")
@click.option("--domains", "-d", default=100, show_default=True, help="Over how many domains.")
@click.option("--seed", default=1, show_default=True, help="Random seed (output is repeatable).")
@click.option("--base-dn", default="dc=mailwarden,dc=test", show_default=True)
@click.option("--with-base/--without-base", default=True, help="Emit the base and ou entries.")
def ldap_generate(subscribers: int, domains: int, seed: int, base_dn: str, with_base: bool) -> None:
    """Write LDIF for N synthetic subscribers with every service combination (for slapadd)."""
    from mailwarden.sampledata import synthetic_ldif

    for chunk in synthetic_ldif(subscribers, domains, seed=seed, base_dn=base_dn,
                                with_base=with_base):
        click.echo(chunk, nl=False)


# ------------------------------------------------------------------ bulk changes


@dataclass
class _Row:
    """One CSV line's changes to one subscriber."""

    line: int
    target: Target
    changes: dict[str, list[str]]


def _parse_row(app: App, line: int, row: dict[str, str]) -> _Row:
    """Validate one CSV row into the new values of each concept it changes."""
    address = (row.get("address") or "").strip()
    if not address:
        raise catalogue.InvalidValue("no address")
    target = _find_user(app, address)
    changes: dict[str, list[str]] = {}
    actions: list[tuple[Service, str]] = []
    for column, cell in row.items():
        if column == "address" or cell is None or cell.strip() == "":
            continue
        name = column.strip().lower().replace("-", "_")
        if name in catalogue.SETTINGS:
            spec = _setting(name, "user")
            if cell.strip() == "-":
                changes[spec.name] = []
            else:
                changes[spec.name] = spec.format(spec.parse(cell.splitlines() if spec.multi else [cell]))
            continue
        service = Service.parse(name)
        action = {"on": "enable", "off": "disable", "inherit": "inherit", "-": "inherit"}.get(
            cell.strip().lower())
        if action is None:
            raise catalogue.InvalidValue(f"{service.value}: {cell!r} is not on, off or inherit")
        actions.append((service, action))
    if actions:
        changes.update(_service_changes(app, target, actions))
    return _Row(line, target, changes)


def _show_values(values: list[str] | tuple[str, ...]) -> str:
    return "(unset)" if not values else " | ".join(values)


@user_group.command("import")
@click.argument("csv_file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--dry-run", is_flag=True, help="Print the changes and write nothing.")
@pass_app
@handle_errors
def user_import(app: App, csv_file: Any, dry_run: bool) -> None:
    """Change many subscribers from CSV_FILE ("-": standard input).

    The first row names the columns: ``address``, then settings (a value; ``-`` unsets
    it; a list setting takes one value per line of the cell) and services (``on``,
    ``off``, ``inherit``).  Empty cells change nothing.  Every line is checked first and
    the changes are printed; with an error on any line nothing is written.  Then each
    line is written through the audited write path as the acting person (``--as``);
    a line the directory refuses is reported and the others go on.
    """
    reader = csv.DictReader(csv_file)
    if not reader.fieldnames or "address" not in [f.strip() for f in reader.fieldnames]:
        fail("the first row must name the columns, one of them 'address'", EX_USAGE)
    for column in reader.fieldnames:
        name = column.strip().lower().replace("-", "_")
        if name != "address" and name not in catalogue.SETTINGS and name not in set(Service):
            fail(f"column {column!r} is neither a setting nor a service (see `mailwarden services`)",
                 EX_USAGE)
    rows: list[_Row] = []
    errors: list[str] = []
    end = reader.line_num
    for row in reader:
        line, end = end + 1, reader.line_num  # a row's first line (a cell may span several)
        if None in row:
            errors.append(f"line {line}: more cells than columns")
            continue
        try:
            rows.append(_parse_row(app, line, {k.strip(): v for k, v in row.items()}))
        except (catalogue.InvalidValue, InvalidAddress, NoSuchEntry, ValueError,
                click.BadParameter) as exc:
            why = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            errors.append(f"line {line}: {why}")
    planned: list[PlannedChange] = []
    for r in rows:
        diff = [(n, r.target.entry.all(n), v) for n, v in r.changes.items()
                if sorted(v) != sorted(r.target.entry.all(n))]
        for name, old, new in diff:
            click.echo(f"line {r.line}: {r.target.probe}: {name}: {_show_values(old)} -> "
                       f"{_show_values(new)}")
        if diff:  # a line that changes nothing is not written (nor recorded)
            planned.append(PlannedChange(r.line, r.target.probe, r.target.entry.dn, r.changes))
    write_planned(app, planned, errors=errors, dry_run=dry_run)
