"""``mailwarden web run|check``: serve the web console, check its configuration."""

from __future__ import annotations

import sys

import click

from mailwarden.cli.common import EX_CONFIG, App, fail, pass_app
from mailwarden.log import setup_logging
from mailwarden.web.config import WebConfig, check_section, key_problems


@click.group("web")
def web_group() -> None:
    """The web console for administrators and subscribers."""


def _checked(app: App) -> WebConfig:
    problems = check_section(app.config) + key_problems(WebConfig.of(app.config))
    if problems:
        fail("configuration error:\n" + "\n".join(f"{app.config.source}:{p}" for p in problems), EX_CONFIG)
    return WebConfig.of(app.config)


@web_group.command("check")
@click.option("--connect", is_flag=True, help="Also reach the directory and the store.")
@pass_app
def web_check(app: App, connect: bool) -> None:
    """Check the [web] section and the secret key file (and with --connect, the directory and store)."""
    web = _checked(app)
    if connect:
        from mailwarden.cli.common import EX_TEMPFAIL
        from mailwarden.directory import DirectoryUnavailable
        from mailwarden.store import StoreUnavailable, store_of

        try:
            app.directory.ping()
            store = store_of(app.config.store)
            store.ping()
            store.close()
        except (DirectoryUnavailable, StoreUnavailable) as exc:
            fail(f"not reachable: {exc}", EX_TEMPFAIL)
    if not web.secure_cookies:
        click.echo("warning: web.secure_cookies is off: serve the console on loopback only", err=True)
    click.echo(f"{app.config.source}: [web] OK (listening on {web.listen}, sessions last "
               f"{web.session_lifetime:g}s)" + (" (directory and store reachable)" if connect else ""))


@web_group.command("run")
@click.option("--listen", metavar="HOST:PORT", help="Override web.listen.")
@pass_app
def web_run(app: App, listen: str | None) -> None:
    """Serve the console until SIGTERM (uvicorn, one process)."""
    import uvicorn

    from mailwarden.metrics import parse_listen
    from mailwarden.web.app import build

    web = _checked(app)
    setup_logging(app.config.general, "web")
    host, port = parse_listen(listen or web.listen)
    server = uvicorn.Server(uvicorn.Config(
        build(app.config), host=host, port=port, log_config=None, access_log=False,
        # The client address (login throttling, the audit log) comes from X-Forwarded-For
        # only when the TLS proxy in front is named.
        proxy_headers=bool(web.trusted_proxies), forwarded_allow_ips=web.trusted_proxies or None,
        server_header=False, timeout_graceful_shutdown=10,
    ))
    server.run()
    sys.exit(0 if server.started else 1)
