"""``mailwarden archive search | export | expire``: the archive mailboxes, through doveadm's HTTP API.

A domain's archive is the mailbox its ``archive_address`` names (see
:mod:`milters.archive`); Dovecot on that account's mailbox host answers the queries
(``[render] doveadm_http_port``, the key in ``doveadm_api_key_file``).  Dovecot's
header search is a case-insensitive substring match, so an address filter is checked
again exactly on the envelope fields each message carries.

Who may look: the domain must be one the caller may see.  Today the CLI acts with the
configuration's own directory account, which sees every hosted domain; the check is
one function (:func:`visible_archive`), where delegated administration will narrow it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import mailbox
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mailwarden.address import InvalidAddress, normalize_address, normalize_domain
from mailwarden.cli.common import EX_CONFIG, EX_NOTFOUND, EX_TEMPFAIL, EX_USAGE, App, fail, pass_app
from mailwarden.directory import DirectoryUnavailable
from mailwarden.doveadm import Doveadm, DoveadmError, read_api_key
from mailwarden.policy import AddressKind
from mailwarden.render import HostPort, default_mailbox_host
from milters.archive import HEADER_PREFIX
from milters.archivestore import mail_host_endpoint

SENDER = HEADER_PREFIX + "Sender"
RECIPIENT = HEADER_PREFIX + "Recipient"
LISTED = ("uid", "date.saved", "size.virtual", "hdr.subject", "hdr.message-id",
          "hdr." + SENDER.lower(), "hdr." + RECIPIENT.lower(), "hdr." + HEADER_PREFIX.lower() + "direction")


@dataclass(frozen=True)
class Archive:
    """One archive mailbox and where its Dovecot answers."""

    domain: str
    address: str
    retention_days: int
    doveadm: Doveadm


class ArchiveFailure(Exception):
    """Why a domain's archive cannot be used, with the exit status that says so."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def find_archive(app: App, domain: str, address: str | None = None) -> Archive:
    """The archive of ``domain`` (or the archive mailbox ``address`` one of its policies names),
    if the caller may see that domain; :class:`ArchiveFailure` says why not."""
    try:
        name = normalize_domain(domain)
        entry = app.directory.find_domain(name)
        if entry is None:
            raise ArchiveFailure(f"no such domain {name}", EX_NOTFOUND)
        canonical = (entry.first("domain_name") or name).lower()
        policy = app.resolver.build(canonical, entry, None)
        target = normalize_address(address) if address else str(policy.get("archive_address") or "")
        if not target:
            raise ArchiveFailure(f"{canonical} has no archive_address", EX_NOTFOUND)
        mailbox_policy = app.resolver.effective_policy(target)
        account = app.directory.find_user(mailbox_policy.canonical or target, entry)
    except (InvalidAddress, ValueError) as exc:
        raise ArchiveFailure(str(exc), EX_USAGE) from None
    except DirectoryUnavailable as exc:
        raise ArchiveFailure(f"directory unavailable: {exc}", EX_TEMPFAIL) from None
    # Only an account with the archive status: never a subscriber's own mailbox.
    status = (account.first("account_status") or "") if account is not None else ""
    if (mailbox_policy.kind is not AddressKind.SUBSCRIBER or mailbox_policy.domain != canonical
            or status.lower() != app.config.ldap.mapping.archive_status_value.lower()):
        raise ArchiveFailure(f"{target} is not an archive mailbox of {canonical}", EX_NOTFOUND)
    r = app.config.render
    if not r.doveadm_http_port:
        raise ArchiveFailure("render.doveadm_http_port is 0: the archive needs doveadm's HTTP API "
                             "on the mailbox hosts", EX_CONFIG)
    mail_host = str(mailbox_policy.get("mail_host") or default_mailbox_host(app.config))
    mailbox_host = mail_host_endpoint(mail_host, r.doveadm_http_port)
    try:
        key = read_api_key(r.doveadm_api_key_file)
    except DoveadmError as exc:
        raise ArchiveFailure(str(exc), EX_CONFIG) from None
    url = f"http://{HostPort(mailbox_host.host, r.doveadm_http_port).service}/doveadm/v1"
    return Archive(canonical, target, int(policy.get("archive_retention_days")), Doveadm(url, key))


def visible_archive(app: App, domain: str, address: str | None = None) -> Archive:
    """:func:`find_archive`, or exit with its reason."""
    try:
        return find_archive(app, domain, address)
    except ArchiveFailure as exc:
        fail(str(exc), exc.code)


@dataclass(frozen=True)
class Filters:
    """What ``search`` and ``export`` look for."""

    sender: str = ""
    recipient: str = ""
    since: dt.date | None = None
    until: dt.date | None = None
    message_id: str = ""

    def query(self) -> list[str]:
        """The doveadm search query (Dovecot narrows, :meth:`matches` decides)."""
        query = ["mailbox", "INBOX"]
        if self.recipient:
            query += ["header", RECIPIENT, self.recipient]
        if self.sender:
            query += ["header", SENDER, self.sender]
        if self.message_id:
            query += ["header", "Message-ID", self.message_id]
        if self.since:
            query += ["savedsince", self.since.isoformat()]
        if self.until:
            query += ["savedbefore", (self.until + dt.timedelta(days=1)).isoformat()]
        return query if len(query) > 2 else [*query, "all"]

    def matches(self, row: dict[str, Any]) -> bool:
        """The exact address match Dovecot's substring search cannot make."""
        if self.recipient and self.recipient not in _addresses(row, RECIPIENT):
            return False
        return not self.sender or self.sender in _addresses(row, SENDER)


def _addresses(row: dict[str, Any], field: str) -> set[str]:
    text = str(row.get("hdr." + field.lower(), ""))
    return {line.strip().strip("<>").lower() for line in text.splitlines() if line.strip()}


def _found(archive: Archive, filters: Filters) -> list[dict[str, Any]]:
    try:
        rows = archive.doveadm.run("fetch", user=archive.address, field=list(LISTED), query=filters.query())
    except DoveadmError as exc:
        fail(str(exc), EX_TEMPFAIL if exc.exit_code in (0, 75) else EX_NOTFOUND)
    return [row for row in rows if filters.matches(row)]


def _address(value: str) -> str:
    try:
        return normalize_address(value) if value else ""
    except InvalidAddress as exc:
        raise click.BadParameter(str(exc)) from None


def filter_options(fn: Callable[..., None]) -> Callable[..., None]:
    """DOMAIN, ``--archive`` and the filters shared by search and export; the command gets
    ``domain``, ``address`` and one :class:`Filters` as ``filters``."""

    @functools.wraps(fn)
    def command(*args: Any, sender: str, recipient: str, since: dt.datetime | None, until: dt.datetime | None,
                message_id: str, **kwargs: Any) -> None:
        filters = Filters(_address(sender), _address(recipient), since.date() if since else None,
                          until.date() if until else None, message_id.strip())
        fn(*args, filters=filters, **kwargs)

    day = click.DateTime(["%Y-%m-%d"])
    for option in reversed((
        click.argument("domain"),
        click.option("--archive", "address", help="Archive mailbox (default: the domain's archive_address)."),
        click.option("--from", "sender", default="", help="Envelope sender (exact)."),
        click.option("--to", "recipient", default="", help="Envelope recipient, Bcc included (exact)."),
        click.option("--since", type=day, help="Archived on or after (YYYY-MM-DD)."),
        click.option("--until", type=day, help="Archived on or before (YYYY-MM-DD)."),
        click.option("--message-id", default="", help="Message-ID (with or without <>)."),
    )):
        command = option(command)
    return command


@click.group("archive")
def archive_group() -> None:
    """The archive of passing mail: each archiving domain's archive mailbox."""


@archive_group.command("search")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@pass_app
def archive_search(app: App, *, domain: str, address: str | None, filters: Filters, as_json: bool) -> None:
    """List archived messages of DOMAIN (exit 1 when none matches)."""
    archive = visible_archive(app, domain, address)
    rows = _found(archive, filters)
    for row in rows:
        listed = _listed(row)
        if as_json:
            click.echo(json.dumps(listed, ensure_ascii=False))
        else:
            click.echo(f"{listed['uid']:>7}  {listed['saved']}  {listed['sender'] or '<>'} -> "
                       f"{', '.join(listed['recipients'])}  {listed['subject']!s:.60}")
    if not as_json:
        click.echo(f"{len(rows)} message(s) in {archive.address}", err=True)
    if not rows:
        raise SystemExit(1)


def _listed(row: dict[str, Any]) -> dict[str, Any]:
    """What search shows of one message."""
    return {
        "uid": int(row["uid"]), "saved": row.get("date.saved", ""), "size": int(row.get("size.virtual", 0)),
        "sender": next(iter(_addresses(row, SENDER)), ""), "recipients": sorted(_addresses(row, RECIPIENT)),
        "subject": row.get("hdr.subject", ""), "message_id": row.get("hdr.message-id", ""),
        "direction": row.get("hdr." + HEADER_PREFIX.lower() + "direction", ""),
    }


def _texts(archive: Archive, rows: list[dict[str, Any]]) -> Iterator[tuple[int, bytes]]:
    for row in rows:
        try:
            [found] = archive.doveadm.run("fetch", user=archive.address, field=["text"],
                                          query=["mailbox", "INBOX", "uid", str(row["uid"])])
        except (DoveadmError, ValueError) as exc:
            fail(f"message {row['uid']}: {exc}", EX_TEMPFAIL)
        yield int(row["uid"]), str(found["text"]).encode("utf-8", "surrogateescape")


@archive_group.command("export")
@filter_options
@click.option("--format", "fmt", type=click.Choice(["mbox", "eml"]), default="mbox", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="mbox: the file to write ('-': standard output); eml: the directory "
                   "(one DOMAIN-UID.eml per message).")
@pass_app
def archive_export(app: App, *, domain: str, address: str | None, filters: Filters, fmt: str,
                   out: Path) -> None:
    """Write the archived messages of DOMAIN that match, envelope fields included."""
    to_stdout = str(out) == "-"
    if to_stdout and fmt != "mbox":
        raise click.UsageError("--out - writes an mbox only")
    archive = visible_archive(app, domain, address)
    rows = _found(archive, filters)
    if fmt == "eml":
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        for uid, data in _texts(archive, rows):
            (out / f"{archive.domain}-{uid}.eml").write_bytes(data)
    elif to_stdout:
        # The mailbox module writes an mbox to a file only: through a private temporary one.
        with tempfile.TemporaryDirectory() as tmp:
            _write_mbox(Path(tmp) / "export.mbox", _texts(archive, rows))
            with (Path(tmp) / "export.mbox").open("rb") as written:
                for chunk in iter(lambda: written.read(1 << 16), b""):
                    click.echo(chunk, nl=False)
    else:
        _write_mbox(out, _texts(archive, rows))
    click.echo(f"{len(rows)} message(s) from {archive.address} written to {out}", err=True)


def _write_mbox(path: Path, texts: Iterator[tuple[int, bytes]]) -> None:
    box = mailbox.mbox(path, create=True)
    try:
        for _uid, data in texts:
            box.add(data)
        box.flush()
    finally:
        box.close()


@archive_group.command("expire")
@click.argument("domains", nargs=-1)
@click.option("--all", "every", is_flag=True,
              help="Every domain whose own entry names an archive_address (the daily timer's run).")
@pass_app
def archive_expire(app: App, domains: tuple[str, ...], every: bool) -> None:
    """Remove what each DOMAIN's archive has kept longer than its archive_retention_days.

    With ``--all`` a domain that cannot be expired (its mailbox host down, its archive
    mailbox gone) is reported and the others are still expired; the exit status is then
    that of the last failure.
    """
    if every == bool(domains):
        raise click.UsageError("name the domains or give --all, not both")
    if every:
        try:
            entries = app.directory.domains_with("archive_address")
        except DirectoryUnavailable as exc:
            fail(f"directory unavailable: {exc}", EX_TEMPFAIL)
        domains = tuple(sorted({(e.first("domain_name") or "").lower() for e in entries} - {""}))
        if not domains:
            click.echo("no domain names an archive_address")
    status = 0
    for domain in domains:
        try:
            _expire(app, domain)
        except ArchiveFailure as exc:
            if not every:
                fail(str(exc), exc.code)
            click.echo(f"mailwarden: {domain}: {exc}", err=True)
            status = exc.code
    if status:
        sys.exit(status)


def _expire(app: App, domain: str) -> None:
    archive = find_archive(app, domain)
    # The received date (INTERNALDATE: when the archive took the copy).
    query = ["mailbox", "INBOX", "before", f"{archive.retention_days}d"]
    try:
        old = archive.doveadm.run("search", user=archive.address, query=query)
        if old:
            archive.doveadm.run("expunge", user=archive.address, query=query)
    except DoveadmError as exc:
        raise ArchiveFailure(str(exc), EX_TEMPFAIL) from exc
    click.echo(f"{archive.domain}: {len(old)} message(s) older than {archive.retention_days} days "
               f"removed from {archive.address}")
