"""``mailwarden policyd run``: bind, drop privileges, serve in the foreground until SIGTERM.

With ``workers = N > 1`` the bound sockets are shared by N forked processes (each
with its own cache, thread pool and store connection); the parent restarts a
worker that dies and forwards SIGTERM/SIGINT to all of them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import sys
from pathlib import Path

from mailwarden.config import Config
from mailwarden.daemon import EX_CONFIG, EX_OSERR, drop_privileges, run_loop, supervise, until_stopped
from mailwarden.endpoint import Endpoint
from mailwarden.log import setup_logging
from policyd.app import PolicyApp
from policyd.config import PolicydConfig
from policyd.server import PolicyServer

log = logging.getLogger("mailwarden.policyd")


def preload() -> None:
    """Import what requests will need later, while the modules are still readable.

    After the switch to ``user`` the Python installation may not be readable (a
    private prefix); dnspython loads record classes and Python the IDNA codec on first use.
    """
    "例え.jp".encode("idna")  # loads the idna and punycode codecs
    for module in ("dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA", "dns.rdtypes.ANY.TXT",
                   "dns.rdtypes.ANY.MX", "dns.rdtypes.ANY.PTR", "dns.rdtypes.ANY.CNAME",
                   "dns.rdtypes.ANY.SOA", "dns.rdtypes.ANY.NS", "dns.rdtypes.ANY.SPF"):
        importlib.import_module(module)


async def serve(config: Config, sockets: list[socket.socket], login_sockets: list[socket.socket]) -> None:
    """Serve on bound sockets until SIGTERM or SIGINT."""
    app = PolicyApp(config)
    server = PolicyServer(app)
    await server.start(sockets, login_sockets)
    log.info("policyd ready: listening on %s; login reports on %s; checks %s; store %s",
             ", ".join(server.addresses) or "-",
             ", ".join(PolicydConfig.of(config).login_report_listen) or "off",
             ", ".join(c.name for c in app.engine.checks) or "none", config.store.backend)
    await until_stopped()
    log.info("policyd stopping: closing %d connection(s)", len(server.connections))
    await server.close()
    app.close()


def run(config: Config) -> int:
    """Run the daemon in the foreground; return the process exit status."""
    cfg = PolicydConfig.of(config)
    mode = int(cfg.socket_mode, 8)
    try:
        sockets = [Endpoint.parse(spec).bind(mode=mode, group=cfg.socket_group) for spec in cfg.listen]
        login = [Endpoint.parse(spec).bind(mode=mode, group=cfg.socket_group)
                 for spec in cfg.login_report_listen]
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return EX_OSERR
    created = [Path(e.where) for e in map(Endpoint.parse, cfg.listen) if e.is_unix]
    preload()
    try:
        drop_privileges(cfg.user, cfg.group, "policyd")
    except (KeyError, PermissionError) as exc:
        log.error("cannot switch to user %r / group %r: %s", cfg.user, cfg.group, exc)
        return EX_CONFIG

    def work() -> int:
        try:
            run_loop(serve(config, sockets, login), cfg.event_loop, threads=cfg.threads, name="policyd")
        except Exception as exc:  # noqa: BLE001 - reported as the exit status
            log.error("policyd worker failed: %s: %s", type(exc).__name__, exc)
            return 1
        return 0

    def after_fork() -> None:
        setup_logging(config.general, "policyd")

    try:
        return supervise(cfg.workers, work, name="policyd", after_fork=after_fork)
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        sys.stderr.flush()
