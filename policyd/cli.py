"""``mailwarden policyd ...``: run and inspect the Postfix policy daemon."""

from __future__ import annotations

import socket
import sys
import time

import click

from mailwarden.cli.common import EX_CONFIG, EX_TEMPFAIL, EX_USAGE, App, fail, handle_errors, pass_app
from mailwarden.log import setup_logging
from mailwarden.store import Store, StoreUnavailable
from policyd.config import PolicydConfig
from policyd.section import check_section


@click.group("policyd")
def policyd_group() -> None:
    """The Postfix policy daemon (check_policy_service)."""


def _checked(app: App) -> None:
    problems = check_section(app.config)
    if problems:
        fail("configuration error:\n" + "\n".join(f"{app.config.source}:{p}" for p in problems),
             EX_CONFIG)


@policyd_group.command("run")
@pass_app
def run_command(app: App) -> None:
    """Serve in the foreground (systemd style) until SIGTERM; logs go where [general] says."""
    _checked(app)
    from policyd.daemon import run

    setup_logging(app.config.general, "policyd")
    sys.exit(run(app.config))


@policyd_group.command("check")
@pass_app
def check_command(app: App) -> None:
    """Validate the [policyd] section (the rest is checked by `config check`)."""
    _checked(app)
    click.echo(f"{app.config.source}: [policyd] OK")


@policyd_group.command("query")
@click.option("--socket", "where", metavar="SPEC", help="unix:/path or inet:host:port "
              "(default: the first [policyd] listen entry)")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the answer.")
@click.argument("attributes", nargs=-1, metavar="NAME=VALUE...")
@pass_app
def query_command(app: App, where: str | None, timeout: float, attributes: tuple[str, ...]) -> None:
    """Send one policy request to a running daemon and print its action.

    Defaults: request=smtpd_access_policy, protocol_state=RCPT, client_address=127.0.0.1.
    """
    from policyd.app import parse_listen
    from policyd.protocol import format_request, iter_actions

    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": "127.0.0.1"}
    for item in attributes:
        name, eq, value = item.partition("=")
        if not eq:
            fail(f"{item!r}: expected NAME=VALUE", EX_USAGE)
        attrs[name] = value
    spec = where or PolicydConfig.of(app.config).listen[0]
    try:
        kind, host, port = parse_listen(spec)
    except ValueError as exc:
        fail(str(exc), EX_USAGE)
    sock = socket.socket(socket.AF_UNIX if kind == "unix" else
                         (socket.AF_INET6 if ":" in host else socket.AF_INET))
    sock.settimeout(timeout)
    try:
        sock.connect(host if kind == "unix" else (host, port))
        sock.sendall(format_request(attrs))
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        fail(f"{spec}: {exc}", EX_TEMPFAIL)
    finally:
        sock.close()
    actions = list(iter_actions(data))
    if not actions:
        fail(f"{spec}: no answer", EX_TEMPFAIL)
    click.echo(actions[0])


def _store(app: App) -> Store:
    from mailwarden.store import store_of

    try:
        return store_of(app.config.store)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)


@policyd_group.group("pbs")
def pbs_group() -> None:
    """POP-before-SMTP windows in the shared store."""


@pbs_group.command("list")
@pass_app
def pbs_list(app: App) -> None:
    """Print open windows: IP, subscriber, seconds left."""
    from mailwarden.pbs import PopBeforeSmtp

    try:
        for ip, user, left in sorted(PopBeforeSmtp(_store(app)).windows()):
            click.echo(f"{ip}\t{user}\t{'-' if left is None else round(left)}")
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)


@pbs_group.command("add")
@click.argument("ip")
@click.argument("subscriber")
@click.option("--ttl", type=int, help="Seconds (default: the subscriber's pop_before_smtp_ttl).")
@pass_app
@handle_errors
def pbs_add(app: App, ip: str, subscriber: str, ttl: int | None) -> None:
    """Open a window for IP as SUBSCRIBER (as a Dovecot login would)."""
    from mailwarden.pbs import PopBeforeSmtp
    from mailwarden.policy import AddressKind

    policy = app.resolver.effective_policy(subscriber)
    if policy.kind is not AddressKind.SUBSCRIBER:
        fail(f"{subscriber}: not a subscriber", 1)
    seconds = ttl if ttl is not None else int(policy.get("pop_before_smtp_ttl"))
    try:
        PopBeforeSmtp(_store(app)).open(ip, policy.canonical or subscriber, seconds)
    except ValueError as exc:
        fail(f"{ip}: {exc}", EX_USAGE)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    click.echo(f"{ip}\t{policy.canonical}\t{seconds}")


@pbs_group.command("remove")
@click.argument("ip")
@pass_app
def pbs_remove(app: App, ip: str) -> None:
    """Close the window of IP."""
    from mailwarden.pbs import PopBeforeSmtp

    try:
        found = PopBeforeSmtp(_store(app)).close(ip)
    except ValueError as exc:
        fail(f"{ip}: {exc}", EX_USAGE)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    if not found:
        fail(f"{ip}: no open window", 1)
    click.echo(f"{ip}: closed")


@policyd_group.command("reputation")
@click.argument("ip")
@click.option("--record", "outcome", type=click.Choice(["rejected", "virus", "spam", "clean"]),
              help="Record one outcome first.")
@pass_app
def reputation_command(app: App, ip: str, outcome: str | None) -> None:
    """Print the own reputation score of IP and of its network."""
    from mailwarden.reputation import Reputation

    reputation = Reputation.from_config(_store(app), app.config)
    try:
        if outcome:
            reputation.record(ip, outcome)
        score, network = reputation.scores(ip)
        click.echo(f"{ip}\tscore {score:.2f}\tnetwork {network:.2f}"
                   f"\t(at {time.strftime('%Y-%m-%d %H:%M:%S')})")
    except ValueError as exc:
        fail(f"{ip}: {exc}", EX_USAGE)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
