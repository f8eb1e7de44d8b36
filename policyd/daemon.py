"""``mailwarden policyd run``: bind, drop privileges, serve in the foreground until SIGTERM.

With ``workers = N > 1`` the bound sockets are shared by N forked processes (each
with its own cache, thread pool and store connection); the parent restarts a
worker that dies and forwards SIGTERM/SIGINT to all of them.
"""

from __future__ import annotations

import importlib
import logging
import socket

from mailwarden.config import Config
from mailwarden.daemon import Daemon, run_daemon, until_stopped
from mailwarden.log import setup_logging
from mailwarden.metrics import Metrics
from policyd.app import PolicyApp
from policyd.config import PolicydConfig
from policyd.metrics import PolicydMetrics
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
    app = PolicyApp(config, metrics=PolicydMetrics(Metrics(on=bool(PolicydConfig.of(config).metrics_listen))))
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
    daemon = Daemon("policyd", [*cfg.listen, *cfg.login_report_listen], socket_mode=cfg.socket_mode,
                    socket_group=cfg.socket_group, user=cfg.user, group=cfg.group, workers=cfg.workers,
                    threads=cfg.threads, event_loop=cfg.event_loop,
                    metrics_listen=cfg.metrics_listen)
    policy = len(cfg.listen)

    def after_fork() -> None:
        setup_logging(config.general, "policyd")

    return run_daemon(daemon, lambda sockets: serve(config, sockets[:policy], sockets[policy:]),
                      after_fork=after_fork, before_drop=preload)
