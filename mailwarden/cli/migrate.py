"""``mailwarden migrate status|import-users|sync|cutover|catch-up|rollback DOMAIN``: move a
domain from a legacy mail system to the mailbox hosts while mail flows (docs/migration.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mailwarden.address import normalize_domain
from mailwarden.catalogue import SETTINGS, InvalidValue
from mailwarden.cli.common import (
    EX_NOTFOUND,
    EX_TEMPFAIL,
    App,
    PlannedChange,
    fail,
    handle_errors,
    pass_app,
    write_planned,
)
from mailwarden.legacyhash import parse_passwd, scheme_of
from mailwarden.migrate import (
    DoveadmMailboxes,
    LegacyServer,
    Mailboxes,
    Migration,
    MigrationError,
    UserCopy,
    UsersOf,
    check_transition,
    is_legacy,
)

STATE_DIR = "/var/lib/mailwarden/migrate"
"""The default ``--state-dir`` (one directory per domain, one file per subscriber)."""

P = ParamSpec("P")
R = TypeVar("R")


def _migration(app: App, domain: str, state_dir: str = "") -> Migration:
    lister = app.directory
    if not hasattr(lister, "users_of"):  # pragma: no cover - every shipped directory has it
        fail("this directory cannot list a domain's subscribers", EX_NOTFOUND)
    users: UsersOf = lister  # type: ignore[assignment]
    return Migration.load(app.directory, users, normalize_domain(domain),
                          archive_status=app.config.ldap.mapping.archive_status_value,
                          state_dir=Path(state_dir) if state_dir else None)


def _refusals(fn: Callable[P, R]) -> Callable[P, R]:
    """A step refused in this state: one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MigrationError as exc:
            fail(str(exc), EX_NOTFOUND)

    return wrapper


@click.group("migrate")
def migrate_group() -> None:
    """Move a domain from a legacy mail system, domain by domain, while mail flows."""


@migrate_group.command("status")
@click.argument("domain")
@pass_app
@handle_errors
@_refusals
def status(app: App, /, domain: str) -> None:
    """Show the domain's migration state, legacy hosts and where its mail goes now."""
    mig = _migration(app, domain)
    policy = app.resolver.build(mig.domain, mig.entry, None)
    click.echo(f"{mig.domain}: {mig.state}  [{mig.entry.dn}]")
    for name in ("migration_state", "legacy_mx", "legacy_mailbox_host", "mail_host"):
        sv = policy.settings[name]
        click.echo(f"  {name:<20} {sv.value or '-':<30} from {sv.source_text}")
    click.echo(f"  subscribers          {len(mig.users)}")
    if is_legacy(mig.state):
        mx = policy.get("legacy_mx") or "(none: deferred)"
        pop = policy.get("legacy_mailbox_host") or "(none: the mailbox hosts)"
        click.echo(f"  inbound SMTP         relayed to the legacy MX {mx}")
        click.echo(f"  POP3/IMAP            proxied to {pop}")
    else:
        click.echo("  inbound SMTP         delivered to the mailbox hosts")
        click.echo("  POP3/IMAP            proxied to the mailbox hosts")
    for problem in policy.problems:
        click.echo(f"  problem: {problem}")


@migrate_group.command("import-users")
@click.argument("domain")
@click.argument("passwd_file", type=click.File("r", encoding="utf-8"))
@click.option("--dry-run", is_flag=True, help="Print the changes and write nothing.")
@click.option("--skip-unknown", is_flag=True,
              help="Report users without a subscriber entry and go on (default: an error).")
@pass_app
@handle_errors
@_refusals
def import_users(app: App, /, domain: str, passwd_file: Any, dry_run: bool, skip_unknown: bool) -> None:
    """Take the subscribers' password hashes over from a legacy PASSWD_FILE ("-": standard
    input) into their legacy_password.

    A line is ``user:hash[:...]`` (vpopmail, checkpassword, Courier userdb and
    /etc/passwd style); the hash is crypt(3) (DES, $1$, $5$, $6$, bcrypt) or
    {SCHEME}hash (CRYPT, MD5-CRYPT, SHA256-CRYPT, SHA512-CRYPT, SSHA, SSHA256, SSHA512)
    and is stored as {SCHEME}hash.  Subscriber entries are not created: they come from
    the directory's provisioning, like every subscriber's.  Every line is checked first
    and the changes are printed (schemes only, never hashes); with an error on any line
    nothing is written.  Then each subscriber is changed through the audited write path
    as the acting person (``--as``); a change the directory refuses is reported and the
    others go on.
    """
    mig = _migration(app, domain)
    users, errors = parse_passwd(passwd_file.read(), mig.domain)
    entries = {(e.first("mail") or "").lower(): e for e in mig.lister.users_of(mig.entry, mig.domain)}
    planned: list[PlannedChange] = []
    unknown = 0
    for user in users:
        entry = entries.get(user.address)
        if entry is None:
            message = f"line {user.line}: no subscriber {user.address} (create its entry first)"
            if skip_unknown:
                unknown += 1
                click.echo(f"skipped: {message}", err=True)
            else:
                errors.append(message)
            continue
        old = entry.first("legacy_password") or ""
        if old == user.hashed:
            continue
        planned.append(PlannedChange(user.line, user.address, entry.dn, {"legacy_password": [user.hashed]}))
        click.echo(f"line {user.line}: {user.address}: legacy_password: "
                   f"{scheme_of(old) if old else '(unset)'} -> {scheme_of(user.hashed)}")
    write_planned(app, planned, errors=sorted(errors, key=lambda e: int(e.split()[1].rstrip(":"))),
                  dry_run=dry_run, unchanged=len(users) - len(planned) - unknown)


def _copy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--master-user", default="migrate", show_default=True,
                     help="the legacy IMAP server's master user (reads every mailbox)"),
        click.option("--master-password-file", type=click.Path(dir_okay=False), required=True,
                     help="file holding the master user's password"),
        click.option("--legacy-host", default="", help="IMAP server to copy from "
                     "(default: the domain's legacy_mailbox_host)"),
        click.option("--legacy-port", type=int, default=0,
                     help="its IMAP port (default: render.legacy_imap_port)"),
        click.option("--pop3-uidls", type=click.Choice(["fetch", "derived"]), default="fetch",
                     show_default=True,
                     help="fetch: keep the UIDLs the legacy POP3 server presents, whatever their "
                          "format (Dovecot's pop3_migration plugin over pop3c, the master user); "
                          "derived: no POP3 connection, UIDLs follow from the kept IMAP UIDs "
                          "(only for a legacy server whose UIDLs are Dovecot's %08Xu%08Xv)"),
        click.option("--legacy-pop3-port", type=int, default=0,
                     help="the legacy POP3 port (default: render.legacy_pop3_port)"),
        click.option("--dovecot-config", default="", help="this mailbox host's dovecot.conf "
                     "(default: render.dovecot_config_dir for the mailbox role)"),
        click.option("--doveadm", default="doveadm", show_default=True, help="doveadm binary"),
        click.option("--user", "only", multiple=True, help="only this subscriber (repeatable)"),
        click.option("--state-dir", default=STATE_DIR, show_default=True,
                     help="where the catch-up copies keep each subscriber's dsync state"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _mailboxes(app: App, mig: Migration, kw: dict[str, Any]) -> Mailboxes:
    try:
        password = Path(kw["master_password_file"]).read_text().strip()
    except OSError as exc:
        raise MigrationError(f"{kw['master_password_file']}: {exc.strerror}") from None
    r = app.config.render
    pop3_port = 0 if kw["pop3_uidls"] == "derived" else kw["legacy_pop3_port"] or r.legacy_pop3_port
    if kw["legacy_host"]:
        try:
            host: str = SETTINGS["legacy_mailbox_host"].parse([kw["legacy_host"]])
        except InvalidValue as exc:
            raise MigrationError(f"--legacy-host: {exc} (--legacy-port, --legacy-pop3-port)") from None
    else:
        host = mig.legacy_host()
    legacy = LegacyServer(host, kw["legacy_port"] or r.legacy_imap_port,
                          kw["master_user"], password, pop3_port=pop3_port)
    config = kw["dovecot_config"] or str(Path(r.dovecot_config_dir.format(role="mailbox")) / "dovecot.conf")
    return DoveadmMailboxes(legacy, config=config, doveadm=kw["doveadm"])


def _users(mig: Migration, only: tuple[str, ...]) -> list[str]:
    chosen = [u.lower() for u in only] or mig.users
    unknown = sorted(set(chosen) - set(mig.users))
    if unknown:
        raise MigrationError(f"not subscribers of {mig.domain}: {', '.join(unknown)}")
    return chosen


def _run_copy(
    mig: Migration, mailboxes: Mailboxes, step: str, users: list[str], title: str
) -> list[UserCopy]:
    """Copy with a progress bar, then print the summary table."""
    console = Console(stderr=True)
    results: list[UserCopy] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[user]}"), console=console,
                  transient=False) as bar:
        task = bar.add_task(title, total=len(users), user="")

        def done(result: UserCopy) -> None:
            results.append(result)
            bar.update(task, advance=1, user=result.user + ("" if result.ok else "  FAILED"))

        mig.copy(mailboxes, step, users, progress=done)
    source, target = ("mailbox host", "legacy") if step == "push" else ("legacy", "mailbox host")
    table = Table(title=f"{mig.domain}: {title}")
    for column in ("subscriber", f"{source} messages", f"{target} before", f"{target} after",
                   "copied", "seconds", "result"):
        # Folded, never cut with an ellipsis: the operator needs whole addresses and errors.
        table.add_column(column, justify="left" if column in ("subscriber", "result") else "right",
                         overflow="fold")
    for r in results:
        table.add_row(r.user, str(r.source_after), str(r.target_before), str(r.target_after),
                      str(r.copied), f"{r.seconds:.1f}", "ok" if r.ok else (r.error or "counts differ"))
    total = sum(r.seconds for r in results)
    table.add_row("total", str(sum(r.source_after for r in results)), "", "",
                  str(sum(r.copied for r in results)), f"{total:.1f}",
                  f"{sum(not r.ok for r in results)} failed")
    Console().print(table)
    return results


def _settle(app: App, mig: Migration, seconds: float | None) -> None:
    policy = app.config.policy
    wait = max(policy.cache_ttl, policy.domain_cache_ttl) if seconds is None else seconds
    if wait > 0:
        click.echo(f"waiting {wait:g} s for every node's cached directory entries to expire", err=True)
        mig.sleep(wait)


_settle_option = click.option(
    "--settle", type=float, default=None,
    help="seconds to wait after the state switch before the last copy (default: the longer of "
         "policy.cache_ttl and policy.domain_cache_ttl, how long a node may still use the old route)",
)


@migrate_group.command("sync")
@click.argument("domain")
@_copy_options
@pass_app
@handle_errors
@_refusals
def sync(app: App, /, domain: str, only: tuple[str, ...], **kw: Any) -> None:
    """Copy the domain's mailboxes from the legacy server (the domain becomes syncing).

    Mail still goes to the legacy system; run it as often as wanted: each run copies
    only what changed.
    """
    mig = _migration(app, domain, kw["state_dir"])
    target = check_transition("sync", mig.state)
    mailboxes = _mailboxes(app, mig, kw)
    users = _users(mig, only)
    if mig.state != target:
        mig.set_state(target)
        click.echo(f"{mig.domain}: migration_state {target}", err=True)
    results = _run_copy(mig, mailboxes, "sync", users, "sync from the legacy server")
    if not all(r.ok for r in results):
        fail(f"{sum(not r.ok for r in results)} mailbox(es) not copied; run sync again", EX_TEMPFAIL)


@migrate_group.command("cutover")
@click.argument("domain")
@_copy_options
@_settle_option
@pass_app
@handle_errors
@_refusals
def cutover(app: App, /, domain: str, only: tuple[str, ...], settle: float | None, **kw: Any) -> None:
    """A last copy, then the switch to the mailbox hosts, then a copy of what the legacy
    system still received during the switch."""
    mig = _migration(app, domain, kw["state_dir"])
    target = check_transition("cutover", mig.state)
    mailboxes = _mailboxes(app, mig, kw)
    users = _users(mig, only)
    results = _run_copy(mig, mailboxes, "sync", users, "final sync before the switch")
    if not all(r.ok for r in results):
        fail("not switched: some mailboxes were not copied (the domain stays syncing)", EX_TEMPFAIL)
    mig.set_state(target)
    click.echo(f"{mig.domain}: migration_state {target}", err=True)
    _settle(app, mig, settle)
    late = _run_copy(mig, mailboxes, "catch-up", users, "mail the legacy system received during the switch")
    if not all(r.ok for r in late):
        fail("switched, but mail the legacy system received during the switch was not all "
             f"copied; run `mailwarden migrate catch-up {mig.domain}` again", EX_TEMPFAIL)


@migrate_group.command("catch-up")
@click.argument("domain")
@_copy_options
@pass_app
@handle_errors
@_refusals
def catch_up(app: App, /, domain: str, only: tuple[str, ...], **kw: Any) -> None:
    """Copy mail the legacy system still holds that a migrated domain's mailbox hosts lack
    (nothing is deleted on either side)."""
    mig = _migration(app, domain, kw["state_dir"])
    if mig.state != "migrated":
        raise MigrationError(f"catch-up is for a migrated domain, {mig.domain} is {mig.state}")
    results = _run_copy(mig, _mailboxes(app, mig, kw), "catch-up", _users(mig, only),
                        "mail left on the legacy server")
    if not all(r.ok for r in results):
        fail(f"{sum(not r.ok for r in results)} mailbox(es) not copied", EX_TEMPFAIL)


@migrate_group.command("rollback")
@click.argument("domain")
@_copy_options
@_settle_option
@pass_app
@handle_errors
@_refusals
def rollback(app: App, /, domain: str, only: tuple[str, ...], settle: float | None, **kw: Any) -> None:
    """Route the domain back to the legacy system, then copy mail the mailbox hosts received
    since the cut-over back to it (nothing deleted there)."""
    mig = _migration(app, domain, kw["state_dir"])
    was = mig.state
    target = check_transition("rollback", was)
    mailboxes = _mailboxes(app, mig, kw)
    users = _users(mig, only)
    mig.set_state(target)
    click.echo(f"{mig.domain}: migration_state {target}", err=True)
    if was != "migrated":
        return  # the legacy system kept receiving and serving everything
    _settle(app, mig, settle)
    results = _run_copy(mig, mailboxes, "push", users, "mail the mailbox hosts received, back to legacy")
    for r in results:
        for message in r.left:
            click.echo(f"{r.user}: left on the mailbox host, not copied back: {message}", err=True)
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            click.echo(f"{r.user}: {r.target_before} message(s) on the legacy server, "
                       f"{r.source_after} on the mailbox host, not copied back: {r.error}", err=True)
        fail(f"{len(failed)} mailbox(es) keep mail on the mailbox host only (listed above)", EX_TEMPFAIL)
