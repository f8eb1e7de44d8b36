"""``mailwarden trace``: one message's way through the policy daemon, the milter,
re-injection and delivery, from the mail logs of one or more nodes."""

from __future__ import annotations

import json

import click

from mailwarden.cli.common import EX_NOTFOUND, EX_USAGE, fail
from mailwarden.trace import JOURNAL, parse_logs, read_lines, render_text, trace

DEFAULT_LOG = "/var/log/mail.log"


@click.command("trace")
@click.argument("message")
@click.option("--logs", "sources", multiple=True, metavar="PATH",
              help=f"A mail log (plain or .gz; repeat for several nodes and rotated files), or "
                   f"'{JOURNAL}' for the systemd journal.  Default {DEFAULT_LOG}.")
@click.option("--since", default="", metavar="TIME", help=f"With '{JOURNAL}': journalctl --since.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def trace_cmd(message: str, sources: tuple[str, ...], since: str, as_json: bool) -> None:
    """Show what happened to MESSAGE (a Postfix queue id, a Message-ID or a mailwarden id):
    every check and filter, its verdict and time, the reply the client saw, each
    re-injected copy and each delivery, in time order."""
    lines: list[str] = []
    for source in sources or (DEFAULT_LOG,):
        try:
            lines.extend(read_lines(source, since=since))
        except OSError as exc:
            fail(f"{source}: {exc.strerror or exc}", EX_USAGE)
    found = trace(parse_logs(lines), message)
    if not found.events:
        fail(f"{message}: not found in {', '.join(sources or (DEFAULT_LOG,))}", EX_NOTFOUND)
    if as_json:
        for event in found.events:
            click.echo(json.dumps(event.as_dict(), ensure_ascii=False))
        return
    for line in render_text(found):
        click.echo(line)
