"""The ``mailwarden`` command: configuration, effective policy, per-domain and per-user toggles.

Commands are thin: they parse arguments, call the core and print.  Exit codes
follow sysexits: 1 no such entry or refused change, 2 usage / bad value,
75 (EX_TEMPFAIL) directory or store unavailable, 78 (EX_CONFIG) bad configuration.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import click

from mailwarden import catalogue
from mailwarden.address import InvalidAddress
from mailwarden.cli.admin import domain_group, ldap_group, user_group
from mailwarden.cli.audit import audit_group
from mailwarden.cli.common import (
    EX_CONFIG,
    EX_TEMPFAIL,
    App,
    fail,
    handle_errors,
    pass_app,
    policy_as_dict,
    print_policy,
)
from mailwarden.cli.migrate import migrate_group
from mailwarden.cli.render import render_group
from mailwarden.cli.selftest import selftest_cmd
from mailwarden.cli.trace import trace_cmd
from mailwarden.config import (
    config_path,
    describe,
    reference_markdown,
    section_problems,
    toml_value,
)

COMMANDS_GROUP = "mailwarden.commands"
"""The entry-point group in which daemons register their command groups."""


class MainGroup(click.Group):
    """The core's commands, and on first use those registered in ``mailwarden.commands``.

    A daemon's distribution names each of its command groups there, the entry
    point's name being the command (``milter = "milters.cli:milter_group"``).  They
    are loaded when the command line is parsed, not when this module is imported,
    so a daemon's CLI module may import :mod:`mailwarden.cli.common` freely.
    """

    _registered = False

    def _load_registered(self) -> None:
        if self._registered:
            return
        self._registered = True
        for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
            command = ep.load()
            if not isinstance(command, click.Command) or ep.name in self.commands:
                raise TypeError(f"entry point {COMMANDS_GROUP}: {ep.name} = {ep.value} is not a "
                                "click command beside the core's commands")
            self.add_command(command, ep.name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_registered()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_registered()
        return super().get_command(ctx, cmd_name)


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "-c", "config_file", metavar="PATH", envvar="MAILWARDEN_CONFIG",
    help="Configuration file (default /etc/mailwarden/mailwarden.toml).",
)
@click.option(
    "--as", "as_login", metavar="LOGIN", envvar="MAILWARDEN_AS",
    help="Act as this administrator (uid) or subscriber (address), bound to the directory "
    "with their own password, so its access rules apply (default: ldap.bind_dn).",
)
@click.option(
    "--password-file", metavar="PATH", envvar="MAILWARDEN_PASSWORD_FILE",
    help="File holding the --as password (default: ask).",
)
@click.pass_context
def main(ctx: click.Context, config_file: str | None, as_login: str | None,
         password_file: str | None) -> None:
    """mailwarden: per-subscriber mail filtering for Postfix and Dovecot."""
    ctx.obj = App(config_file, as_login=as_login, password_file=password_file)


# ------------------------------------------------------------------ config


@main.group("config")
def config_group() -> None:
    """Show or check the configuration."""


@config_group.command("show")
@click.option("--changed", is_flag=True, help="Only settings that differ from the default.")
@pass_app
def config_show(app: App, changed: bool) -> None:
    """Print the effective configuration as TOML, marking defaults."""
    cfg = app.config
    click.echo(f"# configuration from {config_path(app.config_file) or '<built-in defaults>'}")
    section = None
    for item in describe(cfg):
        if changed and item.is_default:
            continue
        sec, _, key = item.key.rpartition(".")
        if sec != section:
            click.echo(f"\n[{sec}]")
            section = sec
        mark = "default" if item.is_default else "set"
        click.echo(f"{key} = {toml_value(item.value)}  # {mark}: {item.doc}")


@config_group.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown) that docs/configuration.md holds."""
    click.echo(reference_markdown(), nl=False)


@config_group.command("check")
@click.option("--connect", is_flag=True, help="Also connect to the directory and the store.")
@pass_app
@handle_errors
def config_check(app: App, connect: bool) -> None:
    """Validate the configuration; name file:key: problem on error."""
    cfg = app.config
    problems = section_problems(cfg)
    if problems:
        fail("configuration error:\n" + "\n".join(f"{cfg.source}:{p}" for p in problems), EX_CONFIG)
    if connect:
        import ldap
        from mailwarden.store import StoreUnavailable, store_of

        app.directory.ping()
        if not app.ldap.search_raw(app.ldap.domain_base, "(objectClass=*)", ["1.1"],
                                   scope=ldap.SCOPE_BASE):
            fail(f"ldap: {app.ldap.domain_base} is not visible to "
                 f"{app.config.ldap.bind_dn or 'an anonymous bind'}: set ldap.bind_dn to an account "
                 "the directory lets read the mail tree (the shipped access rules show anonymous "
                 "clients nothing)", EX_CONFIG)
        try:
            store = store_of(cfg.store)
            store.ping()
            store.close()
        except StoreUnavailable as exc:
            fail(f"store unavailable: {exc}", EX_TEMPFAIL)
        for warning in undeliverable_admins(app):
            click.echo(f"warning: {warning}", err=True)
    click.echo(f"{cfg.source}: OK" + (" (directory and store reachable)" if connect else ""))


def undeliverable_admins(app: App) -> list[str]:
    """Each domain ``admin_address`` (and ``[policy] role_mailbox``) that the directory
    shows resolving nowhere: notices and role addresses sent there would bounce."""
    targets = [(f"{e.dn}: admin_address", e.first("admin_address") or "")
               for e in app.directory.domains_with("admin_address")]
    if app.config.policy.role_mailbox:
        targets.append(("policy.role_mailbox", app.config.policy.role_mailbox))
    found = []
    for where, address in targets:
        try:
            why = app.resolver.resolves_nowhere(address)
        except InvalidAddress as exc:
            why = str(exc)
        if why:
            found.append(f"{where} {address} cannot receive mail: {why}")
    return found


# ------------------------------------------------------------------ explain


@main.command()
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@handle_errors
def explain(app: App, address: str, as_json: bool) -> None:
    """Show the effective policy of ADDRESS and where each value comes from."""
    policy = app.resolver.effective_policy(address)
    if as_json:
        click.echo(json.dumps(policy_as_dict(policy), ensure_ascii=False, indent=2))
    else:
        print_policy(policy)


# ------------------------------------------------------------------ catalogue


@main.command("top")
@click.argument("urls", nargs=-1, metavar="[URL]...")
@click.option("--interval", "-i", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Scrape twice, --interval apart, print the rates once and exit.")
@pass_app
def top(app: App, urls: tuple[str, ...], interval: float, once: bool) -> None:
    """Live rates and backend latency from a node's /metrics (default: every daemon's
    metrics_listen in the configuration), refreshing until interrupted."""
    import time

    from mailwarden.top import render, scrape

    if not urls:
        urls = tuple(f"http://{listen}/metrics" for section in app.config.sections.values()
                     if (listen := getattr(section, "metrics_listen", "")))
    if not urls:
        fail("no metrics to read: give a URL or set metrics_listen in a daemon's section", EX_CONFIG)
    previous = [scrape(u, time.monotonic()) for u in urls]
    try:
        while True:
            time.sleep(interval)
            current = [scrape(u, time.monotonic()) for u in urls]
            screen = render(current, previous)
            if once:
                click.echo(screen)
                return
            click.echo("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  mailwarden top\n\n") + screen, nl=False)
            previous = current
    except KeyboardInterrupt:
        return


@main.command("services")
def services_cmd() -> None:
    """List the services and settings mailwarden knows, with their LDAP attributes."""
    click.echo("services (stored as values of mwEnabledService / mwDisabledService):")
    for spec in catalogue.SERVICES.values():
        paid = "paid" if spec.paid else "    "
        click.echo(f"  {spec.service.value:<18} {spec.ldap_value:<18} {paid}  {spec.description}")
    click.echo("settings (self: a subscriber may change it, within the domain's "
               "self_service_settings):")
    for s in catalogue.SETTINGS.values():
        allowed = f" ({'|'.join(s.choices)})" if s.choices else ""
        who = "self" if s.end_user else "    "
        click.echo(
            f"  {s.name:<22} {s.ldap_attribute:<22} {s.scope:<6} {who}  {s.kind}{allowed}: "
            f"{s.description}"
        )


for _group in (domain_group, user_group, ldap_group, render_group, trace_cmd, selftest_cmd,
               audit_group, migrate_group):
    main.add_command(_group)
