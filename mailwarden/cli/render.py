"""``mailwarden render ...``: Postfix and Dovecot configuration fragments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import click

from mailwarden.cli.common import EX_CONFIG, App, fail, pass_app
from mailwarden.config import Config
from mailwarden.render import (
    DOVECOT_ROLES,
    POSTFIX_INSTANCES,
    Rendered,
    RenderError,
    render_dovecot,
    render_postfix,
)

EX_CANTCREAT = 73


@click.group("render")
def render_group() -> None:
    """Render Postfix / Dovecot configuration from the mailwarden configuration."""


def _run(app: App, renderer: Callable[[Config, Sequence[str], Path], list[Rendered]],
         roles: Sequence[str], out: Path) -> None:
    try:
        written = renderer(app.config, roles, out)
    except RenderError as exc:
        fail("cannot render:\n" + "\n".join(f"{app.config.source}:{p}" for p in exc.problems),
             EX_CONFIG)
    except OSError as exc:
        fail(f"cannot write {exc.filename or out}: {exc.strerror}", EX_CANTCREAT)
    for item in written:
        click.echo(f"{item.name}: {item.directory}/ ({', '.join(item.files)})")


@render_group.command("postfix")
@click.option("--role", "roles", multiple=True, type=click.Choice(list(POSTFIX_INSTANCES)),
              help="Render only this instance (repeat; default: all).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Parent directory: each instance is written to OUT/<last part of its "
              "config_directory>, e.g. OUT/postfix-mx (--out /etc installs in place).")
@pass_app
def postfix_command(app: App, roles: tuple[str, ...], out: Path) -> None:
    """Write main.cf, master.cf and LDAP tables for each front-node Postfix instance.

    \b
    Instances (postmulti, one queue each):
      submission       SMTP-AUTH submission, 587 STARTTLS and 465 TLS
      pop-before-smtp  submission for clients with a recent POP3/IMAP login
      route            aliases and route selection; the milter's re-injections
      mailbox          LMTP to each subscriber's mailbox host from LDAP
      mx               inbound MX and outbound delivery
    The policy daemon and the milter run in the three edge instances.
    """
    _run(app, render_postfix, roles, out)


@render_group.command("dovecot")
@click.option("--role", "roles", multiple=True, type=click.Choice(list(DOVECOT_ROLES)),
              help="Render only this role (repeat; default: both).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Parent directory: each role is written to OUT/<last part of "
              "render.dovecot_config_dir>.")
@pass_app
def dovecot_command(app: App, roles: tuple[str, ...], out: Path) -> None:
    """Write dovecot.conf, conf.d fragments, LDAP args files and the Sieve before-script.

    \b
    Roles:
      mailbox  mailbox host: LDAP auth, Maildir on NFS, quota, quota-status, LMTP, Sieve
      proxy    front node: POP3/IMAP proxy to the subscriber's mailbox host,
               SASL for Postfix submission, login reports for POP-before-SMTP
    Compile the Sieve script after rendering: sievec -c DIR/dovecot.conf DIR/sieve/mailwarden.sieve
    """
    _run(app, render_dovecot, roles, out)
