"""``mailwarden selftest``: probe every configured backend the way the daemons use it."""

from __future__ import annotations

import sys

import click

from mailwarden.cli.common import EX_USAGE, App, fail, pass_app
from mailwarden.selftest import exit_status, probes, run_probes, table


@click.command("selftest")
@click.option("--skip", multiple=True, metavar="NAME", help="Leave out a probe (repeat), e.g. on a "
              "node that runs no milter: --skip clamd --skip spamd --skip reinject --skip dkim.")
@pass_app
def selftest_cmd(app: App, skip: tuple[str, ...]) -> None:
    """Probe the directory, the store, DNS and each daemon's backends (clamd with EICAR,
    spamd with GTUBE, the re-injection smtpd, the DKIM keys); print one row each.

    Exit 0 when every probe passed, 75 when a backend is unavailable, 78 when one
    answers but is misconfigured (a row says how to fix it).
    """
    config = app.config
    every = probes()
    unknown = set(skip) - {name for name, _ in every}
    if unknown:
        fail(f"--skip: no probe named {', '.join(sorted(unknown))} "
             f"(known: {', '.join(name for name, _ in every)})", EX_USAGE)
    rows = run_probes(config, [(name, probe) for name, probe in every if name not in skip])
    for line in table(rows):
        click.echo(line)
    sys.exit(exit_status(rows))
