"""``mailwarden milter ...`` (run, check, dry-run a message), ``mailwarden quarantine ...`` and
``mailwarden dkim ...`` (signing keys)."""

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
from mailwarden.render import default_mailbox_host
from mailwarden.store import StoreUnavailable
from milters.archivestore import ArchiveUnavailable, LmtpStore
from milters.config import MilterConfig, check_section
from milters.quarantine import Quarantine, QuarantineEntry


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
@click.option("--connect", is_flag=True,
              help="Also reach clamd, the spam engine (spamd or rspamd), the store, the directory "
                   "and every archive mailbox a domain names.")
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
    from milters.scanners.rspamd import RspamdScanner
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

    async def rspamd_ping() -> str:
        scanner = RspamdScanner(m.rspamd, timeout=m.rspamd_timeout)
        try:
            return await scanner.ping()
        finally:
            await scanner.close()

    def rspamd_ok() -> str:
        return asyncio.run(rspamd_ping())

    probes: list[tuple[str, Callable[[], str]]] = [
        ("clamd", clamd_ok),
        (m.spam_engine, rspamd_ok if m.spam_engine == "rspamd" else spamd_ok),
        ("store", store_ok),
        ("directory", directory_ok),
        *_archive_probes(app, m.archive_timeout),
    ]
    failed = False
    for name, probe in probes:
        try:
            click.echo(f"{name}: {probe()}")
        except (ScanError, StoreUnavailable, DirectoryUnavailable, ArchiveUnavailable, OSError) as exc:
            click.echo(f"{name}: FAILED {exc}", err=True)
            failed = True
    if failed:
        sys.exit(EX_TEMPFAIL)


def _archive_probes(app: App, timeout: float) -> list[tuple[str, Callable[[], str]]]:
    """One probe per archive mailbox a domain names (``archive_address``): reached on its
    mailbox host as the milter saves a copy, nothing saved.  None when the directory does
    not answer (its own probe says so)."""
    from milters.archive import ArchiveCopy, Archiver
    from milters.service import archive_store

    try:
        entries = app.directory.domains_with("archive_address")
    except DirectoryUnavailable:
        return []
    addresses = sorted({a.lower() for e in entries for a in e.values.get("archive_address", [])})
    store = archive_store(app.config)
    archiver = Archiver(app.resolver, store, node="", default_host=default_mailbox_host(app.config))
    # Dovecot's lmtp opens the mailbox, reading its whole index, for every delivery.
    advice = "; each LMTP copy costs Dovecot more as the archive grows: set [render] archive_imap_port" \
        if isinstance(store, LmtpStore) else ""

    def probe(address: str) -> Callable[[], str]:
        async def reach() -> str:  # a session of its own, closed before it returns
            return await store.probe(await archiver.host_of(ArchiveCopy(address)), address, timeout)

        return lambda: asyncio.run(reach()) + advice

    return [(f"archive {address}", probe(address)) for address in addresses]


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
    q = _quarantine(app)
    try:
        entries = q.entries()
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    missing = 0
    for e in entries:
        mark = ""
        if q.file(e.id) is None:
            mark, missing = "  [file missing]", missing + 1
        click.echo(f"{e.id}  {_when(e.created)}  <{e.sender}> -> {','.join(e.recipients)}  "
                   f"{e.size}B  {e.reason}{mark}")
    click.echo(f"{len(entries)} message(s)", err=True)
    if missing:
        click.echo(f"{missing} of them without their file in {q.dir} "
                   "(is the shared quarantine volume mounted on this node?)", err=True)


@quarantine_group.command("show")
@click.argument("entry_id")
@click.option("--raw", is_flag=True, help="Print the whole message.")
@pass_app
def quarantine_show(app: App, entry_id: str, raw: bool) -> None:
    """Show one quarantined message (envelope, reason, headers)."""
    from milters.quarantine import FileMissing, NotQuarantined

    q = _quarantine(app)
    try:
        entry = q.get(entry_id)
        data = q.read(entry_id)
    except FileMissing as exc:
        if not raw:
            _show_entry(entry)
        fail(str(exc), EX_NOTFOUND)
    except NotQuarantined as exc:
        fail(str(exc), EX_NOTFOUND)
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EX_TEMPFAIL)
    if raw:
        sys.stdout.buffer.write(data)
        return
    _show_entry(entry)
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    click.echo("\n" + head.decode("utf-8", "replace"))


def _show_entry(entry: QuarantineEntry) -> None:
    for label, value in (("id", entry.id), ("created", _when(entry.created)), ("queue id", entry.queue_id),
                         ("sender", f"<{entry.sender}>"), ("recipients", ", ".join(entry.recipients)),
                         ("reason", entry.reason), ("size", str(entry.size)), ("node", entry.node),
                         ("from", entry.from_header), ("subject", entry.subject)):
        click.echo(f"{label:<11} {value}")


@quarantine_group.command("release")
@click.argument("entry_id")
@click.option("--to", "recipients", multiple=True, help="Deliver to these instead (repeat).")
@pass_app
def quarantine_release(app: App, entry_id: str, recipients: tuple[str, ...]) -> None:
    """Deliver a quarantined message through the re-injection smtpd, then delete it."""
    from milters.quarantine import FileMissing, NotQuarantined, ReleaseUnderWay
    from milters.reinject import InjectError, SmtpInjector

    m = MilterConfig.of(app.config)
    try:
        queue_id = _quarantine(app).release(
            entry_id, SmtpInjector(m.reinject, timeout=m.reinject_timeout), recipients=recipients,
            deadline=time.monotonic() + m.reinject_timeout,
        )
    except (FileMissing, ReleaseUnderWay, InjectError, StoreUnavailable) as exc:
        fail(f"not released: {exc}", EX_TEMPFAIL)
    except NotQuarantined as exc:
        fail(str(exc), EX_NOTFOUND)
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


# ------------------------------------------------------------------ dkim


@click.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys (milter.dkim_key_path) and the DNS records that publish them."""


KEY_TYPES = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}


def _selector_of(kind: str, selector: str) -> str:
    from milters.signing import ED25519_SUFFIX

    if kind == "ed25519" and not selector.endswith(ED25519_SUFFIX):
        return selector + ED25519_SUFFIX
    return selector


@dkim_group.command("keygen")
@click.argument("domain")
@click.argument("selector")
@click.option("--type", "kind", type=click.Choice(sorted(KEY_TYPES)), default="rsa", show_default=True,
              help="RSA-2048, or ed25519 (kept and published under selector SELECTOR-ed25519).")
@pass_app
def dkim_keygen(app: App, domain: str, selector: str, kind: str) -> None:
    """Write a new private key (mode 0600, never over an existing one); print its TXT record."""
    from milters.signing import (
        SigningUnavailable,
        generate_key,
        key_path,
        public_record,
        write_new_key,
        zone_txt,
    )

    domain = domain.lower().rstrip(".")
    selector = _selector_of(kind, selector)
    path = key_path(MilterConfig.of(app.config).dkim_key_path, domain, selector)
    try:
        private, algorithm = generate_key(kind)
        write_new_key(path, private)
    except FileExistsError:
        fail(f"{path} exists; remove it first to replace the key", EX_USAGE)
    except (OSError, SigningUnavailable) as exc:
        fail(f"{path}: {exc}", EX_CONFIG)
    click.echo(f"; key written to {path}", err=True)
    click.echo(f"{selector}._domainkey.{domain}. IN TXT {zone_txt(public_record(private, algorithm))}")


@dkim_group.command("check")
@click.argument("domain")
@click.option("--selector", help="The selector (default: the domain's dkim_selector in the directory).")
@pass_app
def dkim_check(app: App, domain: str, selector: str | None) -> None:
    """Compare each key of DOMAIN with the record published in DNS (through [dns]).

    Exit 0 when every key's record matches, 1 when one is missing or differs, 75 when
    DNS or the directory cannot answer.
    """
    from mailwarden.dns import make_resolver
    from mailwarden.dnslookup import resolve_sync
    from milters.signing import (
        SigningUnavailable,
        load_keys,
        public_record,
        published_key,
    )

    domain = domain.lower().rstrip(".")
    if not selector:
        try:  # any address of the domain carries the domain's settings
            policy = app.resolver.effective_policy(f"postmaster@{domain}")
        except DirectoryUnavailable as exc:
            fail(f"directory unavailable: {exc}", EX_TEMPFAIL)
        selector = str(policy.settings["dkim_selector"].value) if "dkim_selector" in policy.settings else ""
        if not selector:
            fail(f"{domain} has no dkim_selector", EX_NOTFOUND)
    try:
        keys = load_keys(MilterConfig.of(app.config).dkim_key_path, domain, selector)
    except SigningUnavailable as exc:
        fail(str(exc), EX_NOTFOUND)
    resolver = make_resolver(app.config.dns)
    ok = True
    for key in keys:
        name = f"{key.selector}._domainkey.{domain}"
        found = resolve_sync(resolver, name, "TXT")
        if isinstance(found, Exception):
            fail(f"{name}: DNS did not answer ({type(found).__name__})", EX_TEMPFAIL)
        records = [b"".join(r.strings).decode("utf-8", "replace") for r in found]
        wanted = published_key(public_record(key.key, key.algorithm))
        if any(published_key(r) == wanted for r in records):
            click.echo(f"{name}: {key.algorithm} key published")
        else:
            ok = False
            click.echo(f"{name}: {'no record' if not records else 'published key differs'}; "
                       f"publish: \"{public_record(key.key, key.algorithm)}\"")
    if not ok:
        sys.exit(EX_NOTFOUND)
