"""The asyncio server: Postfix policy connections (unix and TCP) and their bookkeeping.

Requests are answered on the event-loop thread when everything they need is
cached; anything that could block (a directory miss, DNS) is evaluated again on a
bounded thread pool, under the per-request deadline.  A check's store operation
pauses its request: the operations that requests of all connections wait for are
made together once per event-loop turn (one pipelined round trip to Redis), then
each request goes on where it paused.  Requests on one connection are answered in
order; connections are independent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from dns.asyncresolver import Resolver as AsyncResolver

from mailwarden.daemon import Idle, IdleSweeper
from mailwarden.dnslookup import DnsRecords, resolve_async
from mailwarden.endpoint import Endpoint
from mailwarden.linelog import DecisionLog
from mailwarden.metrics import Backend
from policyd.app import Decision, PolicyApp
from policyd.checks.base import NeedDns, NeedStore, Transaction, WouldBlock
from policyd.config import PolicydConfig
from policyd.dovecot import LoginReportServer
from policyd.protocol import Malformed, PolicyRequest, RequestLimits, RequestReader, format_reply, validate

log = logging.getLogger("mailwarden.policyd")

MALFORMED_ACTION = "DEFER_IF_PERMIT 4.3.5 Malformed policy request"
TIMEOUT_ACTION = "451 4.3.0 Policy service timeout, try again later"
INTERNAL_ACTION = "451 4.3.0 Policy service internal error, try again later"
MAX_QUEUED = 64
"""Requests read ahead on one connection before reading pauses (Postfix sends one at a time)."""
MAX_DNS_ROUNDS = 25
"""DNS round trips one request may take on the event loop (SPF allows 10 lookups + void ones)."""
DISCARD_FACTOR = 4
"""A connection discarding more than this many ``max_request_size`` in one request is closed."""


def _safe(text: str, limit: int = 200) -> str:
    """Untrusted text made fit for one log line."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def _quoted(text: str) -> str:
    return '"' + _safe(text).replace('"', "'") + '"' if (" " in text or not text) else _safe(text)


def decision_line(request: PolicyRequest, decision: Decision, ms: float) -> str:
    """The one log line per decision, in the mail-log style of Postfix's own lines."""
    attrs = request.attrs
    queue_id, name, ip = attrs.get("queue_id", ""), attrs.get("client_name", ""), request.client_address
    sasl, sender, rcpt = request.sasl_username, request.sender, request.recipient
    action, reason = decision.action, decision.reason
    # The common case: short printable values, nothing to quote or escape.
    instance = request.instance
    plain = queue_id + instance + name + ip + sasl + sender + rcpt + request.stage + reason
    if (plain.isprintable() and max(map(len, (queue_id, instance, name, ip, sasl, sender, rcpt))) <= 200
            and action and " " not in action and " " not in instance):
        return (f"queue_id={queue_id or 'NOQUEUE'} instance={instance or '-'} stage={request.stage} "
                f"client={name or 'unknown'}[{ip}] "
                f"sasl={sasl or '-'} from=<{sender}> to=<{rcpt}> action={action} "
                f"check={decision.check or '-'} reason={_quoted(reason)} ms={ms:.2f}")
    return _careful_line(request, decision, ms)


def _careful_line(request: PolicyRequest, decision: Decision, ms: float) -> str:
    name = request["client_name"] or "unknown"
    return (
        f"queue_id={_safe(request['queue_id']) or 'NOQUEUE'} instance={_quoted(request.instance or '-')} "
        f"stage={_safe(request.stage)} "
        f"client={_safe(name)}[{_safe(request.client_address)}] "
        f"sasl={_safe(request.sasl_username) or '-'} from=<{_safe(request.sender)}> "
        f"to=<{_safe(request.recipient)}> action={_quoted(decision.action)} "
        f"check={decision.check or '-'} reason={_quoted(decision.reason)} ms={ms:.2f}"
    )


class PolicyConnection(asyncio.Protocol):
    """One Postfix smtpd (or other client) connection."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.reader = RequestReader(server.limits)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[PolicyRequest | Malformed] = deque()
        self.busy = False
        self.paused = False
        self.closed = False
        self.txn = Transaction()
        self.last_active = time.monotonic()
        self.peer = "?"

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register, or refuse when the process is at ``max_connections``."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if not self.server.admit(self):
            self.closed = True
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Parse what arrived and answer what is complete."""
        self.last_active = time.monotonic()
        try:
            events = self.reader.feed(data)
        except Exception as exc:  # noqa: BLE001 - a parser fault closes this connection only
            log.error("connection %s: request parser failed (%s: %s); closing", self.peer,
                      type(exc).__name__, exc)
            self.close()
            return
        if self.reader.discarded > DISCARD_FACTOR * self.server.limits.max_request_size:
            log.warning("connection %s: over-long request never ended (%d bytes discarded); closing",
                        self.peer, self.reader.discarded)
            self.close()
            return
        if events:
            self.queue.extend(events)
            if not self.busy:
                self.drain()
        if len(self.queue) > MAX_QUEUED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; note a request cut off in the middle."""
        self.closed = True
        self.server.forget(self)
        if self.reader.pending:
            log.warning("connection %s: client disconnected in the middle of a request (%d bytes)",
                        self.peer, self.reader.pending)

    @property
    def idle_since(self) -> float | None:
        """When the client last sent something, or None while its request is evaluated."""
        return None if self.busy else self.last_active

    def drop(self, reason: str) -> None:
        """Close an idle connection (the sweeper logs one line for all it closes)."""
        self.close()

    def close(self) -> None:
        """Close the transport (queued requests and any partial request are dropped)."""
        self.closed = True
        self.queue.clear()
        self.reader.reset()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ answering

    def drain(self) -> None:
        """Answer queued requests in order until one needs the thread pool."""
        server = self.server
        while self.queue and not self.busy and not self.closed:
            item = self.queue.popleft()
            started = time.perf_counter()
            if isinstance(item, Malformed):
                self.answer_malformed(item.reason, started)
                continue
            problem = validate(item)
            if problem is not None:
                self.answer_malformed(problem, started)
                continue
            txn = self.transaction(item)
            if not self.settle(item, txn, started, functools.partial(server.app.engine.decide, item, txn,
                                                                     inline=True)):
                self.busy = True
                return
        if self.paused and len(self.queue) <= MAX_QUEUED // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def resume(self, request: PolicyRequest, txn: Transaction, started: float, need: NeedStore,
               result: Any) -> None:
        """Go on with a request paused for the store; answer it unless it must wait again."""
        if self.settle(request, txn, started, functools.partial(self.server.app.engine.resume, need, result)):
            self.busy = False
            self.drain()

    def settle(self, request: PolicyRequest, txn: Transaction, started: float,
               attempt: Callable[[], Decision]) -> bool:
        """Answer ``request`` with ``attempt``'s decision, or hand it on when it must wait (the
        store's next round trip, DNS, the thread pool); whether it was answered."""
        server = self.server
        try:
            decision = attempt()
        except NeedStore as need:
            server.wait_for_store(self, request, txn, started, need)
            return False
        except NeedDns as need:
            server.spawn(self.answer_blocking(request, txn, started, need))
            return False
        except WouldBlock:
            server.spawn(self.answer_blocking(request, txn, started))
            return False
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the connection
            decision = server.internal_error(exc)
        self.answer(request, decision, started)
        return True

    def transaction(self, request: PolicyRequest) -> Transaction:
        """The state of the request's mail transaction (fresh when Postfix sent no instance).

        Keyed by instance, client and sender, so that a client replaying an instance
        never sees another transaction's lookups.
        """
        instance = request.instance
        if not instance:
            return Transaction()
        key = f"{instance}\0{request.client_address}\0{request.sender}"
        if self.txn.instance != key:
            self.txn = Transaction(key)
        return self.txn

    async def answer_blocking(self, request: PolicyRequest, txn: Transaction, started: float,
                              need: NeedDns | None = None) -> None:
        """Evaluate after DNS lookups or on the thread pool, under the deadline; answer; go on."""
        server = self.server
        deadline = server.cfg.request_timeout
        left = max(deadline - (time.perf_counter() - started), 0.001)
        work = (server.decide_after_dns(request, txn, started, need) if need is not None
                else server.decide_in_thread(request, txn, started))
        try:
            decision = await asyncio.wait_for(work, left)
        except TimeoutError:
            decision = Decision(TIMEOUT_ACTION, "deadline", f"no answer within {deadline:g} s")
            # The worker may still finish later: let it write to an abandoned transaction.
            self.txn = Transaction()
        except Exception as exc:  # noqa: BLE001 - reported as a temporary failure
            decision = server.internal_error(exc)
        self.busy = False
        self.answer(request, decision, started)
        self.drain()

    def answer(self, request: PolicyRequest, decision: Decision, started: float) -> None:
        """Send the action and log the decision."""
        if self.closed or self.transport is None:
            return
        self.transport.write(format_reply(decision.action))
        server = self.server
        seconds = time.perf_counter() - started
        server.metrics.decided(request.stage, decision.check, decision.action, seconds)
        # The line is built only when it will be written (INFO is on).
        if ((server.log_all or decision.action != "DUNNO")
                and server.decisions.logger.isEnabledFor(logging.INFO)):
            server.decisions.info(decision_line(request, decision, seconds * 1000))

    def answer_malformed(self, reason: str, started: float) -> None:
        """A defined answer for a request that cannot be evaluated, and one log line."""
        if self.closed or self.transport is None:
            return
        self.transport.write(format_reply(MALFORMED_ACTION))
        self.server.metrics.decided("", "malformed", MALFORMED_ACTION, time.perf_counter() - started)
        log.warning("connection %s: malformed policy request (%s): answered %s ms=%.2f", self.peer,
                    _safe(reason), MALFORMED_ACTION, (time.perf_counter() - started) * 1000)


class PolicyServer:
    """The policy listeners and the Dovecot login-report endpoint of one process."""

    def __init__(self, app: PolicyApp, *, executor: ThreadPoolExecutor | None = None) -> None:
        self.app = app
        self.cfg: PolicydConfig = PolicydConfig.of(app.config)
        self.limits = RequestLimits(self.cfg.max_line_length, self.cfg.max_request_size,
                             self.cfg.max_attributes)
        self.log_all = self.cfg.log_decisions == "all"
        self.decisions = DecisionLog(log)
        self.executor = executor
        """Where blocking evaluation runs: the event loop's default executor unless given."""
        self.connections: set[PolicyConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.store_waiting: list[tuple[PolicyConnection, PolicyRequest, Transaction, float, NeedStore]] = []
        """Requests paused for a store operation, made at the end of this event-loop turn."""
        self.servers: list[asyncio.AbstractServer] = []
        self.login_reports: LoginReportServer | None = None
        self.refused = 0
        self._refused_logged = 0.0
        self.sweeper = IdleSweeper(self.connections, self.cfg.idle_timeout, report=_report_idle)
        self.addresses: list[str] = []
        self.metrics = app.services.metrics
        self.watcher: asyncio.Task[None] | None = None
        if self.metrics.on:
            self.metrics.poller.add(lambda: self.refused, self.metrics.refused)

    # ------------------------------------------------------------ life cycle

    async def start(
        self, sockets: list[socket.socket] | None = None,
        login_sockets: list[socket.socket] | None = None,
    ) -> None:
        """Serve on the given (already bound) sockets, or bind the configured ones."""
        loop = asyncio.get_running_loop()
        self.app.services.directory.loop_thread = threading.get_ident()
        self.decisions.start(loop)
        if sockets is None:
            sockets = [bind_listener(spec, self.cfg) for spec in self.cfg.listen]
        if login_sockets is None:
            login_sockets = [bind_listener(spec, self.cfg) for spec in self.cfg.login_report_listen]
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(lambda: PolicyConnection(self), sock=sock)
            else:
                srv = await loop.create_server(lambda: PolicyConnection(self), sock=sock)
            self.servers.append(srv)
            self.addresses.append(_sock_name(sock))
        if login_sockets:
            self.login_reports = LoginReportServer(self.app, self.executor)
            await self.login_reports.start(login_sockets)
        self.sweeper.start()
        if self.metrics.on:
            self.watcher = loop.create_task(self.watch())

    async def watch(self, every: float = 1.0) -> None:
        """Each second: the open connections and the polled totals into the metrics, then
        the values written for the exporter."""
        metrics = self.metrics
        try:
            while True:
                metrics.connections.set(len(self.connections))
                metrics.publish()
                await asyncio.sleep(every)
        finally:
            metrics.connections.set(0)
            metrics.publish()

    async def close(self) -> None:
        """Stop listening, close every connection, forget work in progress."""
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        for srv in self.servers:
            srv.close()
        if self.login_reports is not None:
            await self.login_reports.close()
        self.sweeper.stop()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.decisions.flush()

    # ------------------------------------------------------------ connections

    def admit(self, conn: PolicyConnection) -> bool:
        """Take a new connection unless the process is full (logged at most every 10 s)."""
        if len(self.connections) >= self.cfg.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged > 10:
                self._refused_logged = now
                log.warning("max_connections (%d) reached: %d connection(s) refused so far",
                            self.cfg.max_connections, self.refused)
            return False
        self.connections.add(conn)
        return True

    def forget(self, conn: PolicyConnection) -> None:
        """A connection has gone."""
        self.connections.discard(conn)

    def wait_for_store(self, conn: PolicyConnection, request: PolicyRequest, txn: Transaction,
                       started: float, need: NeedStore) -> None:
        """Make ``need``'s operation with the others of this event-loop turn, then resume."""
        if not self.store_waiting:
            asyncio.get_running_loop().call_soon(self.make_store_calls)
        self.store_waiting.append((conn, request, txn, started, need))

    def make_store_calls(self) -> None:
        """The operations paused requests wait for, in one :meth:`Store.call_many
        <mailwarden.store.base.Store.call_many>` (bounded by the store's timeout); then
        each request goes on."""
        waiting, self.store_waiting = self.store_waiting, []
        try:
            results = self.app.services.store.call_many([entry[4].call for entry in waiting])
        except Exception as exc:  # noqa: BLE001 - each check answers it as its own failure
            results = [exc] * len(waiting)
        for (conn, request, txn, started, need), result in zip(waiting, results, strict=True):
            conn.resume(request, txn, started, need, result)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a connection's blocking evaluation as a task."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------ evaluation

    async def decide_in_thread(self, request: PolicyRequest, txn: Transaction,
                               started: float) -> Decision:
        """Evaluate on the pool; work that waited past the deadline is not started."""
        loop = asyncio.get_running_loop()
        give_up = started + self.cfg.request_timeout
        engine = self.app.engine

        def work() -> Decision:
            if time.perf_counter() > give_up:
                raise TimeoutError
            return engine.decide(request, txn, inline=False)

        return await loop.run_in_executor(self.executor, work)

    async def decide_after_dns(self, request: PolicyRequest, txn: Transaction, started: float,
                               need: NeedDns) -> Decision:
        """Resolve what the checks asked for on the event loop, then evaluate again inline.

        An SPF evaluation may ask several times (include:, redirect=); a directory
        miss on the way still goes to the thread pool.
        """
        resolver = self.app.services.async_dns
        backend = self.app.services.dns_backend
        for _ in range(MAX_DNS_ROUNDS):
            answers = await asyncio.gather(*(_resolve(resolver, n, t, backend) for n, t in need.queries))
            txn.dns.update(zip(need.queries, answers, strict=True))
            try:
                return self.app.engine.decide(request, txn, inline=True)
            except NeedDns as again:
                need = again
            except WouldBlock:
                break
        return await self.decide_in_thread(request, txn, started)

    @staticmethod
    def internal_error(exc: BaseException) -> Decision:
        """A temporary failure for an unexpected fault, logged once."""
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return Decision(INTERNAL_ACTION, "internal", f"{type(exc).__name__}: {exc}")


async def _resolve(resolver: AsyncResolver, name: str, rdtype: str,
                   backend: Backend | None) -> DnsRecords | Exception:
    """One lookup on the event loop, timed when metrics are on."""
    if backend is None:
        return await resolve_async(resolver, name, rdtype)
    started = time.perf_counter()
    found = await resolve_async(resolver, name, rdtype)
    backend.observe(time.perf_counter() - started, isinstance(found, Exception))
    return found


# ---------------------------------------------------------------- sockets


def _sock_name(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"inet:{name[0]}:{name[1]}" if sock.family == socket.AF_INET else f"inet:[{name[0]}]:{name[1]}"


def _report_idle(stale: Sequence[Idle]) -> None:
    unfinished = sum(1 for c in stale if isinstance(c, PolicyConnection) and c.reader.pending)
    if unfinished:
        log.warning("closed %d idle connection(s), %d in the middle of a request "
                    "(no terminating blank line)", len(stale), unfinished)
    else:
        log.debug("closed %d idle connection(s)", len(stale))


def bind_listener(spec: str, cfg: PolicydConfig) -> socket.socket:
    """Bind and listen on ``unix:/path`` or ``inet:host:port`` with the configured socket mode."""
    return Endpoint.parse(spec).bind(mode=int(cfg.socket_mode, 8), group=cfg.socket_group)
