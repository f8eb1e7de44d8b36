"""``mailwarden policyd ...``: run and inspect the Postfix policy daemon."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable

import click

from mailwarden.cli.common import EX_CONFIG, EX_TEMPFAIL, EX_USAGE, App, fail, handle_errors, pass_app
from mailwarden.log import setup_logging
from mailwarden.reputation import ListKind, Reputation, ReputationLists
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


@click.group("reputation")
def reputation_group() -> None:
    """Client reputation: scores, and the operator's allow and deny lists (every node at once)."""


def _reputation(app: App) -> tuple[Reputation, ReputationLists]:
    store = _store(app)
    rc = PolicydConfig.of(app.config).reputation
    return (Reputation.from_config(store, app.config),
            ReputationLists(store, allow=rc.allow_networks, deny=rc.deny_networks))


def _steer(action: Callable[[], str], what: str) -> None:
    try:
        click.echo(action())
    except ValueError as exc:
        fail(f"{what}: {exc}", EX_USAGE)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)


@reputation_group.command("show")
@click.argument("ip")
@click.option("--record", "outcome", type=click.Choice(["rejected", "virus", "spam", "clean"]),
              help="Record one outcome first.")
@pass_app
def reputation_show(app: App, ip: str, outcome: str | None) -> None:
    """The scores of IP and its network, the list entry that covers it, and what the
    reputation check does with it now."""
    reputation, lists = _reputation(app)
    rc = PolicydConfig.of(app.config).reputation

    def show() -> str:
        if outcome:
            reputation.record(ip, outcome)
        score, network, listed = reputation.assess(ip, lists)
        if listed is not None:
            why = f": {listed.reason}" if listed.reason else ""
            done = "allowed" if listed.kind == "allow" else "denied"
            verdict = f"{done} by {listed.network} ({listed.source}{why})"
        elif score >= rc.reject_score:
            verdict = f"refused (554): score >= reject_score {rc.reject_score:g}"
        elif network >= rc.network_reject_score:
            verdict = (f"refused (554): network score >= network_reject_score {rc.network_reject_score:g}, "
                       "unless a DNS allow list or a provider's SPF vouches")
        elif score >= rc.tempfail_score:
            verdict = f"deferred (450): score >= tempfail_score {rc.tempfail_score:g}"
        else:
            verdict = "not refused for its reputation (DNSBL zones are asked per message)"
        return (f"{ip}\tscore {score:.2f}\tnetwork {network:.2f}\t(at {time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                f"  {verdict}")

    _steer(show, ip)


@reputation_group.command("reset")
@click.argument("target", metavar="IP|NETWORK")
@pass_app
def reputation_reset(app: App, target: str) -> None:
    """Forget the scores of an IP, or of a network and every IP in it."""
    reputation, _ = _reputation(app)
    _steer(lambda: f"{target}: {reputation.reset(target)} score key(s) removed", target)


def _ttl(value: str | None) -> float | None:
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = value[:-1], value[-1:]
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise click.BadParameter(f"{value!r}: a duration such as 30m, 12h or 7d")
    return int(number) * units[unit]


_LIST_HELP = {"allow": "never refused for its reputation", "deny": "554 5.7.1 always"}


def _list_command(kind: ListKind) -> None:
    @reputation_group.command(kind, help=f"{kind.capitalize()} IP|NETWORK on every node at once "
                              f"({_LIST_HELP[kind]}).")
    @click.argument("target", metavar="IP|NETWORK")
    @click.option("--reason", default="", help="Why (shown by list and show, and in the log).")
    @click.option("--for", "duration", help="How long (30m, 12h, 7d; default: until unlisted).")
    @pass_app
    def command(app: App, target: str, reason: str, duration: str | None) -> None:
        _, lists = _reputation(app)
        ttl = _ttl(duration)

        def put() -> str:
            entry = lists.put(kind, target, reason, ttl)
            return f"{entry.network}\t{entry.kind}\t{entry.reason}"

        _steer(put, target)


_list_command("allow")
_list_command("deny")


@reputation_group.command("unlist")
@click.argument("target", metavar="IP|NETWORK")
@pass_app
def reputation_unlist(app: App, target: str) -> None:
    """Remove the store's allow or deny entry for IP|NETWORK (the configuration's stay)."""
    _, lists = _reputation(app)

    def unlist() -> str:
        if not lists.remove(target):
            fail(f"{target}: no entry in the store", 1)
        return f"{target}: unlisted"

    _steer(unlist, target)


@reputation_group.command("list")
@pass_app
def reputation_list(app: App) -> None:
    """Every allow and deny entry: network, kind, source, reason."""
    _, lists = _reputation(app)
    _steer(lambda: "\n".join(f"{e.network}\t{e.kind}\t{e.source}\t{e.reason}" for e in lists.entries())
           or "(no entries)", "list")
