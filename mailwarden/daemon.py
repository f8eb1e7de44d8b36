"""Running a daemon, shared by the policy daemon and the milter.

:func:`run_daemon`: the parent binds the listening sockets (as root where it must), drops
privileges, then serves itself (``workers = 1``) or forks ``workers`` processes that share the
sockets, restarts one that dies and forwards SIGTERM/SIGINT to all of them.  Each
worker runs one event loop with one thread pool as its default executor: the only
place blocking work (the directory, SQLite, files, SMTP re-injection) runs.
:class:`IdleSweeper` closes connections whose peer has gone quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mailwarden.endpoint import Endpoint
from mailwarden.metrics import Exporter

log = logging.getLogger("mailwarden.daemon")

EVENT_LOOPS = ("uvloop", "asyncio")


def drop_privileges(user: str, group: str, name: str) -> None:
    """Switch to ``user`` (and ``group`` or the user's primary group) when running as root.

    Raises KeyError for an unknown user or group, PermissionError when not allowed.
    """
    if os.geteuid() != 0:
        if user:
            log.debug("not root: staying uid %d (%s.user %r not applied)", os.geteuid(), name, user)
        return
    if not user:
        log.warning("running as root: set [%s] user to drop privileges", name)
        return
    entry = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    log.info("switched to user %s (uid %d, gid %d)", user, entry.pw_uid, gid)


def run_loop(main: Coroutine[Any, Any, None], event_loop: str = "uvloop", *, threads: int = 16,
             name: str = "worker") -> None:
    """Run ``main`` on ``event_loop`` (``uvloop`` or ``asyncio``) with a pool of ``threads``
    threads as the loop's default executor (``loop.run_in_executor(None, ...)``)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name)

    async def with_pool() -> None:
        asyncio.get_running_loop().set_default_executor(pool)
        await main

    try:
        if event_loop == "uvloop":
            import uvloop

            uvloop.run(with_pool())
        else:
            asyncio.run(with_pool())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@dataclass(frozen=True)
class Daemon:
    """How a daemon runs: its name in logs, where it listens, as whom, in how many processes."""

    name: str
    listen: Sequence[str]
    """``unix:/path`` or ``inet:host:port`` endpoints, bound before privileges are dropped."""
    socket_mode: str = "0660"
    socket_group: str = ""
    user: str = ""
    group: str = ""
    workers: int = 1
    threads: int = 16
    event_loop: str = "uvloop"
    metrics_listen: str = ""
    """``host:port`` of ``/metrics`` (served by the process that forks the workers); empty: off."""


def run_daemon(daemon: Daemon, serve: Callable[[list[socket.socket]], Coroutine[Any, Any, None]], *,
               after_fork: Callable[[], None] | None = None,
               before_drop: Callable[[], None] | None = None) -> int:
    """Bind ``daemon.listen``, drop privileges, then ``serve(sockets)`` on an event loop in
    ``daemon.workers`` processes until SIGTERM/SIGINT; the exit status.

    ``before_drop`` runs while still privileged (e.g. importing what later needs reading);
    ``after_fork`` in each new worker (e.g. logging set up again).  With
    ``daemon.metrics_listen`` set, the node's ``/metrics`` is served from this process
    (:class:`mailwarden.metrics.Exporter`) before any worker starts.
    """
    endpoints = [Endpoint.parse(spec) for spec in daemon.listen]
    try:
        sockets = [e.bind(mode=int(daemon.socket_mode, 8), group=daemon.socket_group) for e in endpoints]
    except OSError as exc:
        log.error("%s: cannot listen: %s", daemon.name, exc.strerror or exc)
        return os.EX_OSERR
    if before_drop is not None:
        before_drop()
    try:
        drop_privileges(daemon.user, daemon.group, daemon.name)
    except (KeyError, PermissionError) as exc:
        log.error("%s: cannot switch to user %r / group %r: %s", daemon.name, daemon.user, daemon.group, exc)
        return os.EX_CONFIG

    exporter: Exporter | None = None
    if daemon.metrics_listen:
        exporter = Exporter(daemon.metrics_listen, daemon.name)
        try:
            exporter.start()
        except OSError as exc:
            log.error("%s: cannot serve metrics on %s: %s", daemon.name, daemon.metrics_listen,
                      exc.strerror or exc)
            return os.EX_OSERR

    def work() -> int:
        try:
            run_loop(serve(sockets), daemon.event_loop, threads=daemon.threads, name=daemon.name)
        except Exception:
            log.exception("%s worker failed", daemon.name)
            return 1
        return 0

    def in_worker() -> None:
        if exporter is not None:
            exporter.after_fork()
        if after_fork is not None:
            after_fork()

    try:
        return supervise(daemon.workers, work, name=daemon.name, after_fork=in_worker,
                         reaped=exporter.worker_died if exporter is not None else None)
    finally:
        if exporter is not None:
            exporter.stop()
        for endpoint in endpoints:
            if endpoint.is_unix:
                with contextlib.suppress(OSError):
                    Path(endpoint.where).unlink()
        sys.stderr.flush()


def supervise(workers: int, work: Callable[[], int], *, name: str,
              after_fork: Callable[[], None] | None = None,
              reaped: Callable[[int], None] | None = None) -> int:
    """Run ``work`` in ``workers`` forked processes until SIGTERM/SIGINT; restart one that dies.

    ``work`` returns the worker's exit status.  With one worker it runs in this process.
    ``reaped(pid)`` hears of every worker that ended.
    """
    if workers <= 1:
        return work()
    stopping = False
    children: dict[int, float] = {}

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
            if after_fork is not None:
                after_fork()
            status = 1
            try:
                status = work()
            finally:
                os._exit(status)
        return pid

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(workers):
        children[fork()] = time.monotonic()
    log.info("%s: %d workers started (pids %s)", name, workers, " ".join(map(str, children)))
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        born = children.pop(pid, None)
        if born is not None and reaped is not None:
            reaped(pid)
        if born is None or stopping:
            continue
        log.error("%s worker %d exited (status %d); starting another", name, pid, code)
        status = 1
        if time.monotonic() - born < 1.0:
            time.sleep(1.0)  # a worker that dies at once would otherwise spin
        if not stopping:  # a SIGTERM during the pause must not start a worker nobody stops
            children[fork()] = time.monotonic()
    return 0 if stopping else status


class Idle(Protocol):
    """A connection the sweeper may close."""

    @property
    def idle_since(self) -> float | None:
        """Monotonic time since which the peer has been silent, or None while we work for it."""
        ...

    def drop(self, reason: str) -> None:
        """Close the connection with one log line."""
        ...


class IdleSweeper:
    """Closes connections silent for ``timeout`` seconds (checked a few times per timeout).

    Connections keep their idle time on the monotonic clock; ``report`` (if given) hears
    of each sweep that closed something.
    """

    def __init__(self, connections: Collection[Idle], timeout: float, peer: str = "peer",
                 report: Callable[[list[Idle]], None] | None = None) -> None:
        self.connections = connections
        self.timeout = timeout
        self.peer = peer
        self.report = report
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping on the running loop."""
        self.task = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        """Stop sweeping."""
        if self.task is not None:
            self.task.cancel()

    def sweep(self, now: float) -> list[Idle]:
        """Close the connections idle since before ``now - timeout``; the ones closed."""
        cutoff = now - self.timeout
        stale = [c for c in self.connections if (since := c.idle_since) is not None and since < cutoff]
        if stale and self.report is not None:
            self.report(stale)  # before closing: the report may look at what each one holds
        for conn in stale:
            conn.drop(f"{self.peer} silent for over {self.timeout:g}s")
        return stale

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(min(self.timeout / 4, 30.0), 0.05))
            self.sweep(time.monotonic())
