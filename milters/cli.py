"""``mailwarden milter ...`` (run, check, dry-run a message) and ``mailwarden quarantine ...``."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click

from mailwarden.address import InvalidAddress
from mailwarden.cli.common import EX_CONFIG, EX_NOTFOUND, EX_TEMPFAIL, EX_USAGE, App, fail, pass_app
from mailwarden.directory import DirectoryUnavailable
from mailwarden.log import setup_logging
from mailwarden.store import StoreUnavailable
from milters.config import MilterConfig, check_section
from milters.quarantine import Quarantine


@click.group("milter")
def milter_group() -> None:
    """The content milter (smtpd_milters / non_smtpd_milters)."""


def _checked(app: App) -> None:
    problems = check_section(app.config)
    if problems:
        fail("configuration error:\n" + "\n".join(f"{app.config.source}:{p}" for p in problems), EX_CONFIG)


@milter_group.command("run")
@click.option("--socket", "socket_", metavar="unix:/PATH", help="Override milter.socket.")
@pass_app
def milter_run(app: App, socket_: str | None) -> None:
    """Serve the milter until SIGTERM."""
    import dataclasses

    from milters.app import run

    cfg = app.config
    if socket_:
        cfg = cfg.with_section(dataclasses.replace(MilterConfig.of(cfg), socket=socket_))
    _checked(app)
    setup_logging(cfg.general, "milter")
    sys.exit(run(cfg))


@milter_group.command("check")
@click.option("--connect", is_flag=True, help="Also reach clamd, spamd, the store and the directory.")
@pass_app
def milter_check(app: App, connect: bool) -> None:
    """Check the [milter] section (and with --connect, its backends)."""
    _checked(app)
    m = MilterConfig.of(app.config)
    click.echo(f"{app.config.source}: [milter] OK (end-of-message budget {m.eom_budget:g}s)")
    if not connect:
        return
    from mailwarden.store import store_of
    from milters.scanners import ScanError
    from milters.scanners.clamd import ClamdScanner
    from milters.scanners.spamd import SpamdScanner

    def store_ok() -> str:
        store_of(app.config.store).ping()
        return "OK"

    def directory_ok() -> str:
        app.directory.ping()
        return "OK"

    def clamd_ok() -> str:
        return asyncio.run(ClamdScanner(m.clamd, timeout=m.clamd_timeout).ping())

    def spamd_ok() -> str:
        return asyncio.run(SpamdScanner(m.spamd, timeout=m.spamd_timeout).ping())

    probes: list[tuple[str, Callable[[], str]]] = [
        ("clamd", clamd_ok),
        ("spamd", spamd_ok),
        ("store", store_ok),
        ("directory", directory_ok),
    ]
    failed = False
    for name, probe in probes:
        try:
            click.echo(f"{name}: {probe()}")
        except (ScanError, StoreUnavailable, DirectoryUnavailable, OSError) as exc:
            click.echo(f"{name}: FAILED {exc}", err=True)
            failed = True
    if failed:
        sys.exit(EX_TEMPFAIL)


@milter_group.command("scan")
@click.argument("message_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from", "sender", default="", help="Envelope sender (default: null).")
@click.option("--rcpt", "recipients", multiple=True, required=True, help="Envelope recipient (repeat).")
@pass_app
def milter_scan(app: App, message_file: Path, sender: str, recipients: tuple[str, ...]) -> None:
    """Dry-run MESSAGE_FILE through the filters: print each recipient's outcome, change nothing."""
    from milters.filters import Envelope
    from milters.message import BodySpool, Message, split_entity
    from milters.service import build_service
    from milters.verdict import Recipient

    _checked(app)
    service = build_service(app.config)
    raw = message_file.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    headers, body_start = split_entity(raw, 0, len(raw))
    spool = BodySpool(service.limits.memory_limit, None)
    spool.write(raw[body_start:])
    try:
        rcpts = [Recipient(r, (), service.resolver.effective_policy(r), raw=f"<{r}>") for r in recipients]
    except DirectoryUnavailable as exc:
        fail(f"directory unavailable: {exc}", EX_TEMPFAIL)
    except InvalidAddress as exc:
        fail(str(exc), EX_USAGE)
    message = Message(headers, spool, service.limits)
    verdict = asyncio.run(service.pipeline.run(Envelope(sender=sender), message, rcpts,
                                               time.monotonic() + MilterConfig.of(app.config).eom_budget))
    click.echo(f"disposition: {verdict.disposition.value}")
    for outcome in verdict.outcomes:
        click.echo(f"  {outcome.summary()}")
        for edit in outcome.edits:
            click.echo(f"      {edit}")
    for key, value in verdict.findings.items():
        click.echo(f"  {key}: {value}")
    message.close()


# ------------------------------------------------------------------ quarantine


@click.group("quarantine")
def quarantine_group() -> None:
    """List, show, release and delete quarantined mail."""


def _quarantine(app: App) -> Quarantine:
    from mailwarden.store import store_of

    m = MilterConfig.of(app.config)
    return Quarantine(store_of(app.config.store), m.quarantine_dir,
                      retention_days=m.quarantine_days, node=app.config.general.node_name)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@quarantine_group.command("list")
@pass_app
def quarantine_list(app: App) -> None:
    """One line per quarantined message, oldest first."""
    try:
        entries = _quarantine(app).entries()
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    for e in entries:
        click.echo(f"{e.id}  {_when(e.created)}  <{e.sender}> -> {','.join(e.recipients)}  "
                   f"{e.size}B  {e.reason}")
    click.echo(f"{len(entries)} message(s)", err=True)


@quarantine_group.command("show")
@click.argument("entry_id")
@click.option("--raw", is_flag=True, help="Print the whole message.")
@pass_app
def quarantine_show(app: App, entry_id: str, raw: bool) -> None:
    """Show one quarantined message (envelope, reason, headers)."""
    from milters.quarantine import NotQuarantined

    q = _quarantine(app)
    try:
        entry = q.get(entry_id)
        data = q.read(entry_id)
    except NotQuarantined as exc:
        fail(str(exc), EX_NOTFOUND)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    if raw:
        sys.stdout.buffer.write(data)
        return
    for label, value in (("id", entry.id), ("created", _when(entry.created)), ("queue id", entry.queue_id),
                         ("sender", f"<{entry.sender}>"), ("recipients", ", ".join(entry.recipients)),
                         ("reason", entry.reason), ("size", str(entry.size)), ("node", entry.node),
                         ("from", entry.from_header), ("subject", entry.subject)):
        click.echo(f"{label:<11} {value}")
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    click.echo("\n" + head.decode("utf-8", "replace"))


@quarantine_group.command("release")
@click.argument("entry_id")
@click.option("--to", "recipients", multiple=True, help="Deliver to these instead (repeat).")
@pass_app
def quarantine_release(app: App, entry_id: str, recipients: tuple[str, ...]) -> None:
    """Deliver a quarantined message through the re-injection smtpd, then delete it."""
    from milters.quarantine import NotQuarantined
    from milters.reinject import InjectError, SmtpInjector

    m = MilterConfig.of(app.config)
    try:
        queue_id = _quarantine(app).release(
            entry_id, SmtpInjector(m.reinject, timeout=m.reinject_timeout), recipients=recipients,
            deadline=time.monotonic() + m.reinject_timeout,
        )
    except NotQuarantined as exc:
        fail(str(exc), EX_NOTFOUND)
    except (InjectError, StoreUnavailable) as exc:
        fail(f"not released: {exc}", EX_TEMPFAIL)
    click.echo(f"{entry_id}: released, queued as {queue_id}")


@quarantine_group.command("delete")
@click.argument("entry_ids", nargs=-1, required=True)
@pass_app
def quarantine_delete(app: App, entry_ids: tuple[str, ...]) -> None:
    """Delete quarantined messages."""
    from milters.quarantine import NotQuarantined

    q = _quarantine(app)
    missing = 0
    for entry_id in entry_ids:
        try:
            removed = q.delete(entry_id)
        except NotQuarantined as exc:
            click.echo(f"mailwarden: {exc}", err=True)
            missing += 1
            continue
        except StoreUnavailable as exc:
            fail(f"store unavailable: {exc}", EX_TEMPFAIL)
        click.echo(f"{entry_id}: {'deleted' if removed else 'not found'}")
        missing += 0 if removed else 1
    if missing:
        sys.exit(EX_NOTFOUND)


@quarantine_group.command("expire")
@pass_app
def quarantine_expire(app: App) -> None:
    """Delete quarantined files past their retention (run daily)."""
    try:
        count = _quarantine(app).expire()
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    click.echo(f"{count} expired message(s) deleted")
