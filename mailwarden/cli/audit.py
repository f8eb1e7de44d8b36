"""``mailwarden audit show``: the changes made through mailwarden, as the directory lets the
acting person read them (``--as``; a domain's administrators see their domain's only)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import click

from mailwarden.address import normalize_domain
from mailwarden.cli.common import App, handle_errors, pass_app

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d``/``12h``/``30m`` ago, or an ISO 8601 date or time (UTC unless it says)."""
    now = now or datetime.now(UTC)
    m = _DURATION.fullmatch(text.strip().lower())
    if m:
        return now - timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected e.g. 7d, 12h or 2026-12-01T09:00",
                                 param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@click.group("audit")
def audit_group() -> None:
    """The audit log of changes made with the CLI and the web console."""


@audit_group.command("show")
@click.option("--domain", "-d", metavar="DOMAIN", help="Only changes to this domain's entries.")
@click.option("--since", metavar="WHEN", help="From this time on: 7d, 12h, or an ISO date/time.")
@click.option("--limit", "-n", default=1000, show_default=True, help="At most this many (the newest).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_app
@handle_errors
def audit_show(app: App, domain: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Who changed what, the old and new values, when and from where, oldest first."""
    from mailwarden import audit

    records = audit.read(app.ldap, domain=normalize_domain(domain) if domain else None,
                         since=parse_since(since) if since else None, limit=limit)
    for r in records:
        if as_json:
            click.echo(json.dumps({
                "when": r.when.isoformat(), "actor": r.actor, "bound_as": r.creator,
                "origin": r.origin, "target": r.target, "domain": r.domain,
                "changes": [{"name": c.name, "old": list(c.old), "new": list(c.new)}
                            for c in r.changes],
            }, ensure_ascii=False))
            continue
        when = r.when.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{when}Z  {r.actor} ({r.creator})  from {r.origin or '?'}  {r.target}")
        for c in r.changes:
            click.echo(f"    {c.name}: {_values(c.old)} -> {_values(c.new)}")


def _values(values: tuple[str, ...]) -> str:
    return "(unset)" if not values else ", ".join(values)
