"""``mailwarden policyd run``: bind, drop privileges, serve in the foreground until SIGTERM.

With ``workers = N > 1`` the bound sockets are shared by N forked processes (each
with its own cache, thread pool and store connection); the parent restarts a
worker that dies and forwards SIGTERM/SIGINT to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mailwarden.config import Config
from mailwarden.log import setup_logging
from policyd.app import PolicyApp, parse_listen
from policyd.config import PolicydConfig
from policyd.server import PolicyServer, bind_listener

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


def drop_privileges(user: str, group: str) -> None:
    """Switch to ``user`` (and ``group`` or the user's primary group) when running as root."""
    if os.geteuid() != 0:
        if user:
            log.debug("not root: staying uid %d (policyd.user %r not applied)", os.geteuid(), user)
        return
    if not user:
        log.warning("running as root: set [policyd] user to drop privileges")
        return
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    log.info("switched to user %s (uid %d, gid %d)", user, entry.pw_uid, gid)


async def serve(config: Config, sockets: list[socket.socket], login_sockets: list[socket.socket]) -> None:
    """Serve on bound sockets until SIGTERM or SIGINT."""
    app = PolicyApp(config)
    server = PolicyServer(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(sockets, login_sockets)
    log.info("policyd ready: listening on %s; login reports on %s; checks %s; store %s",
             ", ".join(server.addresses) or "-",
             ", ".join(PolicydConfig.of(config).login_report_listen) or "off",
             ", ".join(c.name for c in app.engine.checks) or "none", config.store.backend)
    await stop.wait()
    log.info("policyd stopping: closing %d connection(s)", len(server.connections))
    await server.close()
    app.close()


def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run ``main`` on the configured event loop (``uvloop`` or ``asyncio``)."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _run_worker(config: Config, sockets: list[socket.socket], login: list[socket.socket]) -> int:
    try:
        run_loop(serve(config, sockets, login), PolicydConfig.of(config).event_loop)
    except Exception as exc:  # noqa: BLE001 - reported as the exit status
        log.error("policyd worker failed: %s: %s", type(exc).__name__, exc)
        return 1
    return 0


def _supervise(config: Config, sockets: list[socket.socket], login: list[socket.socket]) -> int:
    """Fork ``workers`` processes and keep them running until SIGTERM/SIGINT."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def fork() -> int:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            setup_logging(config.general, "policyd")
            os._exit(_run_worker(config, sockets, login))
        return pid

    children: dict[int, float] = {}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(PolicydConfig.of(config).workers):
        children[fork()] = time.monotonic()
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        born = children.pop(pid, None)
        if born is None:
            continue
        if not stopping:
            log.error("worker %d exited (status %d); starting another", pid, code)
            status = 1
            if time.monotonic() - born < 1.0:
                time.sleep(1.0)  # a worker that dies at once would otherwise spin
            if not stopping:  # a SIGTERM during the pause must not start a worker nobody stops
                children[fork()] = time.monotonic()
    return 0 if stopping else status


def run(config: Config) -> int:
    """Run the daemon in the foreground; return the process exit status."""
    cfg = PolicydConfig.of(config)
    created: list[Path] = []
    try:
        sockets = [bind_listener(spec, cfg) for spec in cfg.listen]
        login = [bind_listener(spec, cfg) for spec in cfg.login_report_listen]
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return 71  # EX_OSERR
    for spec in cfg.listen:
        kind, where, _ = parse_listen(spec)
        if kind == "unix":
            created.append(Path(where))
    preload()
    try:
        drop_privileges(cfg.user, cfg.group)
    except (KeyError, PermissionError) as exc:
        log.error("cannot switch to user %r / group %r: %s", cfg.user, cfg.group, exc)
        return 78  # EX_CONFIG
    try:
        if cfg.workers > 1:
            return _supervise(config, sockets, login)
        return _run_worker(config, sockets, login)
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        sys.stderr.flush()
