"""mailwarden's own milter server: one asyncio loop for every MTA connection.

libmilter runs a thread per connection, polls and reads for every packet and calls
into Python (taking the GIL) for every step.  Here one event loop reads each socket
in large chunks, cuts many packets per read (:mod:`milters.protocol`) and drives the
same :class:`~milters.app.ContentMilter` objects directly.  Work that may block (the
directory at RCPT, a scan cache in the shared store, quarantine, re-injection) goes to a
bounded thread pool, so the loop never waits; the connection's later packets wait until
its answer is written.  A small message is decided on the loop itself: the clamd scan
and the spamd check are non-blocking I/O there, and no thread is woken
(:meth:`~milters.app.ContentMilter.eom_on_loop`).  Notices leave from an outbox thread
after the reply.

The milter's actions (``getsymval``, ``setreply``, header and body edits, ``delrcpt``)
go to a :class:`SessionContext` standing in for libmilter's context: it keeps the
macros per stage and records the edits, which are sent before the final reply.
Every failure gets one log line and a defined answer: a tempfail where the MTA waits
for one, else the connection is closed (and Postfix applies
``milter_default_action``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import Milter

from mailwarden.address import InvalidAddress
from mailwarden.policy import PolicyResolver
from milters import protocol as p
from milters.app import ContentMilter

log = logging.getLogger("mailwarden.milter")

ERROR_REPLY = "451 4.3.0 Temporary content filter problem; try again later"
_ERROR = p.encode_replycode(ERROR_REPLY)
_SIMPLE = {
    Milter.CONTINUE: p.encode(p.CONTINUE),
    Milter.ACCEPT: p.encode(p.ACCEPT),
    Milter.DISCARD: p.encode(p.DISCARD),
    Milter.SKIP: p.encode(p.SKIP),
}
_REJECT = p.encode(p.REJECT)
_TEMPFAIL = p.encode(p.TEMPFAIL)
#: The "no reply" protocol bit of each step.
_NR_BIT = {
    p.CONNECT: Milter.P_NR_CONN, p.HELO: Milter.P_NR_HELO, p.MAIL: Milter.P_NR_MAIL,
    p.RCPT: Milter.P_NR_RCPT, p.DATA: Milter.P_NR_DATA, p.UNKNOWN: Milter.P_NR_UNKN,
    p.HEADER: Milter.P_NR_HDR, p.EOH: Milter.P_NR_EOH, p.BODY: Milter.P_NR_BODY,
}
#: Macro stages searched by getsymval, the latest first.
_STAGES = "ENLTRMHC"
#: Stages whose macros belong to one message (dropped when the next one starts).
_MESSAGE_STAGES = "RTLNBE"
_FAMILIES = {"4": socket.AF_INET, "6": socket.AF_INET6, "L": socket.AF_UNIX, "U": socket.AF_UNSPEC}
#: Packets held for a connection that is waiting for a thread before reading pauses.
_BACKLOG = 64


Done = Callable[[Any, BaseException | None], None]
T = TypeVar("T")


class WorkerPool:
    """A fixed set of threads fed through one queue; each result goes back to the loop.

    Lighter than a ThreadPoolExecutor: no Future, no condition variables, one queue
    put and one ``call_soon_threadsafe`` per hand-off.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"milter-{i}", daemon=True)
                         for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], Any], done: Done) -> None:
        """Run ``work`` in a thread; ``done(result, error)`` runs on the loop afterwards."""
        self._queue.put((work, done))

    def run(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``work`` in a thread; its result (or exception) arrives through the future."""
        future: asyncio.Future[T] = self.loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.submit(work, done)
        return future

    def _serve(self) -> None:
        get, call_back = self._queue.get, self.loop.call_soon_threadsafe
        while (item := get()) is not None:
            work, done = item
            try:
                result: Any = work()
                error: BaseException | None = None
            except Exception as exc:  # noqa: BLE001 - handed to the loop, which logs and answers
                result, error = None, exc
            try:
                call_back(done, result, error)
            except RuntimeError:  # the loop is closed: shutting down
                return

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let queued work finish, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)


def answerable_at_once(resolver: PolicyResolver, recipient: bytes) -> bool:
    """Whether RCPT needs no directory lookup: a fresh cached policy or an invalid address."""
    try:
        return resolver.cached(recipient.decode("utf-8", "surrogateescape")) is not None
    except InvalidAddress:
        return True


class SessionContext:
    """What libmilter's context does for the milter object: macros, the reply, the edits."""

    __slots__ = ("_parsed", "edits", "macros", "reply")

    def __init__(self) -> None:
        self.macros: dict[str, bytes] = {}  # stage -> raw macro data, parsed when asked
        self._parsed: dict[str, dict[str, str]] = {}
        self.reply: str | None = None
        self.edits: list[bytes] = []

    def setpriv(self, priv: object) -> None:
        """libmilter keeps the milter object here; the session already holds it."""

    def set_macros(self, data: bytes) -> None:
        """Keep a macro packet's data for its stage (replacing the stage's earlier ones)."""
        stage = chr(data[0])
        self.macros[stage] = data
        self._parsed.pop(stage, None)

    def getsymval(self, name: str) -> str | None:
        """A macro's value (``i`` also finds ``{i}`` and the other way round)."""
        other = name[1:-1] if name.startswith("{") and name.endswith("}") else f"{{{name}}}"
        # A stage whose raw data holds neither ``name\0`` nor ``name}\0`` is not parsed.
        bare = (other if name.startswith("{") else name).encode("utf-8", "surrogateescape")
        plain, braced = bare + b"\0", bare + b"}\0"
        macros, parsed = self.macros, self._parsed
        for stage in _STAGES:
            raw = macros.get(stage)
            if raw is None or len(raw) < 2:
                continue
            if stage not in parsed and plain not in raw and braced not in raw:
                continue
            values = parsed.get(stage)
            if values is None:
                values = parsed[stage] = p.parse_macros(raw)[1]
            found = values.get(name, values.get(other))
            if found is not None:
                return found
        return None

    def setreply(self, rcode: str, xcode: str | None = None, msg: str | None = None, *lines: str) -> None:
        """The SMTP reply for the next reject or tempfail."""
        self.reply = p.reply_text(rcode, xcode, msg, *lines)

    def addheader(self, field: str, value: str, idx: int = -1) -> None:
        """Append (idx -1) or insert a header field."""
        self.edits.append(p.encode_addheader(field, value) if idx < 0
                          else p.encode_insheader(idx, field, value))

    def chgheader(self, field: str, idx: int, value: str | None) -> None:
        """Change (None or empty: delete) the idx-th field called ``field``."""
        self.edits.append(p.encode_chgheader(idx, field, value or ""))

    def addrcpt(self, rcpt: str, params: object = None) -> None:
        """Add an envelope recipient."""
        self.edits.append(p.encode_addrcpt(rcpt))

    def delrcpt(self, rcpt: str) -> None:
        """Remove an envelope recipient."""
        self.edits.append(p.encode_delrcpt(rcpt))

    def replacebody(self, body: bytes) -> None:
        """The next chunk of the replacement body."""
        self.edits.append(p.encode_replbody(bytes(body)))

    def progress(self) -> None:
        """Nothing to do: the whole answer is written when the end-of-message work is done."""

    def drop_message_macros(self, keep_mail: bool) -> None:
        """Forget the macros of the message that ended (and of MAIL unless it just arrived)."""
        for stage in _MESSAGE_STAGES if keep_mail else "M" + _MESSAGE_STAGES:
            self.macros.pop(stage, None)
            self._parsed.pop(stage, None)

    def clear(self) -> None:
        """Forget every macro, the reply and the edits (a new SMTP connection follows)."""
        self.macros.clear()
        self._parsed.clear()
        self.reply = None
        self.edits = []


class MilterSession(asyncio.Protocol):
    """One MTA connection: negotiation, then the steps of each message, in order."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.reader = p.PacketReader(server.max_packet)
        self.ctx = SessionContext()
        self.milter: ContentMilter | None = None
        self.protocol = 0
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[str, bytes]] = deque()
        self.busy = False  # a step runs in a thread; later packets wait
        self.closed = False
        self.paused = False
        self.in_message = False
        self.failed = False  # a step without reply failed: defer at the next answer
        self.last = server.loop.time()

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start reading."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        """Cut packets and run them (unless a step is still running in a thread)."""
        self.last = self.server.loop.time()
        try:
            packets = self.reader.feed(data)
        except p.ProtocolError as exc:
            self.drop(str(exc))
            return
        self.pending.extend(packets)
        if self.busy:
            if len(self.pending) > _BACKLOG and not self.paused and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._drain()

    def eof_received(self) -> bool | None:
        """The MTA closed its side: close ours (after a running step is answered)."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Abort the message in progress and close the milter (once its thread is done)."""
        self.closed = True
        self.server.sessions.discard(self)
        self.pending.clear()
        if not self.busy:
            self._close_milter()

    def drop(self, reason: str) -> None:
        """Close the connection after a protocol violation, with one log line."""
        log.error("milter connection dropped: %s", reason)
        if self.transport is not None:
            self.transport.close()
        self.closed = True
        self.pending.clear()

    # ------------------------------------------------------------ stepping

    def _drain(self) -> None:
        pending, handlers = self.pending, _HANDLERS
        while pending and not self.busy and not self.closed:
            cmd, data = pending.popleft()
            try:
                handlers[cmd](self, data)
            except p.ProtocolError as exc:
                self.drop(f"{exc} (command {cmd!r})")
            except Exception:  # a bug or a surprise in a milter step: defer, keep serving
                log.exception("milter step %r failed; deferring", cmd)
                self._step_failed(cmd)
        if self.paused and not self.busy and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _answer(self, rc: int) -> None:
        """Send the reply for a step's result, as libmilter would (nothing for NOREPLY)."""
        if rc == Milter.NOREPLY:
            return
        if self.failed:
            self.ctx.reply = None
            self._write(_ERROR)
            return
        self._write(self._final(rc))

    def _final(self, rc: int) -> bytes:
        reply, self.ctx.reply = self.ctx.reply, None
        if rc in (Milter.REJECT, Milter.TEMPFAIL):
            kind = "5" if rc == Milter.REJECT else "4"
            if reply and reply[0] == kind:
                return p.encode_replycode(reply)
            return _REJECT if rc == Milter.REJECT else _TEMPFAIL
        simple = _SIMPLE.get(rc)
        if simple is None:
            log.error("milter step returned %r; deferring", rc)
            return _ERROR
        return simple

    def _step_failed(self, cmd: str) -> None:
        """A step raised: tempfail if the MTA waits for an answer, else defer at the next one."""
        self.ctx.edits.clear()
        self.ctx.reply = None
        if cmd in (p.OPTNEG, p.ABORT, p.QUIT, p.QUIT_NC, p.MACRO) or self.milter is None:
            self.drop(f"command {cmd!r} could not be handled")
        elif self.protocol & _NR_BIT.get(cmd, 0):
            self.failed = True
        else:
            self._write(_ERROR)

    def _in_thread(self, work: Callable[[], int], then: Callable[[int], None]) -> None:
        """Run ``work`` in the pool; ``then(result)`` on the loop when it is done."""
        self.busy = True
        self.server.pool.submit(work, partial(self._finished, then))

    def _finished(self, then: Callable[[int], None], result: int | None, error: BaseException | None) -> None:
        self.busy = False
        self.last = self.server.loop.time()
        if self.closed:
            self._close_milter()
            return
        try:
            if error is not None:
                raise error
            assert result is not None
            then(result)
        except Exception:
            log.exception("milter step failed in its thread; deferring")
            self.ctx.edits.clear()
            self.ctx.reply = None
            self._write(_ERROR)
        self._drain()

    def _milter(self) -> ContentMilter:
        if self.milter is None:
            raise p.ProtocolError("command before option negotiation")
        return self.milter

    def _close_milter(self) -> None:
        milter, self.milter = self.milter, None
        if milter is None:
            return
        try:
            if self.in_message:
                milter.abort()
            milter.close()
        except Exception:
            log.exception("milter close failed")
        self.in_message = False

    # ------------------------------------------------------------ the steps

    def _optneg(self, data: bytes) -> None:
        if self.milter is not None:
            raise p.ProtocolError("second option negotiation")
        offer = p.parse_optneg(data)
        if offer.version < 2:
            raise p.ProtocolError(f"MTA speaks milter protocol version {offer.version}")
        milter = self.server.factory()
        milter._setctx(self.ctx)
        opts = [offer.actions & p.V6_ACTIONS_MASK, offer.protocol & p.V6_PROTOCOL_MASK, 0, 0]
        if milter.negotiate(opts) != Milter.CONTINUE:
            raise p.ProtocolError("option negotiation refused")
        self.milter, self.protocol = milter, opts[1]
        self._write(p.encode_optneg(p.Optneg(min(offer.version, p.VERSION), opts[0], opts[1])))

    def _macro(self, data: bytes) -> None:
        if not data:
            raise p.ProtocolError("macro packet without a command")
        self.ctx.set_macros(data)

    def _connect(self, data: bytes) -> None:
        c = p.parse_connect(data)
        address = c.address[5:] if c.address.startswith("IPv6:") else c.address
        hostaddr: Any = None
        if c.family == "4":
            hostaddr = (address, c.port)
        elif c.family == "6":
            hostaddr = (address, c.port, 0, 0)
        elif c.family == "L":
            hostaddr = address
        self._answer(self._milter().connect(c.hostname, _FAMILIES[c.family], hostaddr))

    def _helo(self, data: bytes) -> None:
        args = p.split_strings(data)
        self._answer(self._milter().hello(args[0].decode("utf-8", "surrogateescape") if args else ""))

    def _mail(self, data: bytes) -> None:
        args = p.split_strings(data)
        if not args:
            raise p.ProtocolError("MAIL without a sender")
        milter = self._milter()
        self.ctx.drop_message_macros(keep_mail=True)
        self.ctx.edits.clear()
        self.in_message, self.failed = True, False
        self._answer(milter.envfrom_bytes(*args))

    def _rcpt(self, data: bytes) -> None:
        args = p.split_strings(data)
        if not args:
            raise p.ProtocolError("RCPT without a recipient")
        milter = self._milter()
        if self.failed:
            self._answer(Milter.TEMPFAIL)
        elif answerable_at_once(milter.service.resolver, args[0]):
            self._answer(milter.envrcpt_bytes(*args))
        else:
            self._in_thread(lambda: int(milter.envrcpt_bytes(*args)), self._answer)

    def _data(self, data: bytes) -> None:
        self._answer(self._milter().data())

    def _header(self, data: bytes) -> None:
        name, value = p.parse_header(data)
        self._milter().keep_header(name, value)
        self._continue(Milter.P_NR_HDR)

    def _eoh(self, data: bytes) -> None:
        self._answer(self._milter().eoh())

    def _body(self, data: bytes) -> None:
        self._milter().keep_body(data)
        self._continue(Milter.P_NR_BODY)

    def _continue(self, no_reply_bit: int) -> None:
        """Answer CONTINUE to a step, or nothing where the MTA agreed to no reply."""
        self._answer(Milter.NOREPLY if self.protocol & no_reply_bit else Milter.CONTINUE)

    def _unknown(self, data: bytes) -> None:
        args = p.split_strings(data)
        self._answer(self._milter().unknown(args[0].decode("utf-8", "surrogateescape") if args else ""))

    def _eom(self, data: bytes) -> None:
        milter = self._milter()
        if data:
            milter.keep_body(data)  # libmilter: data with the end of body is its last chunk
        if self.failed:
            log.warning("%s: deferred after an earlier failed step",
                        self.ctx.getsymval("i") or "NOQUEUE")
            milter.abort()
            self._end_message()
            self._write(_ERROR)
            return
        if milter.eom_on_loop_ready():
            self.busy = True
            task = self.server.loop.create_task(milter.eom_on_loop(self.server.pool.run))
            self.server.tasks.add(task)
            task.add_done_callback(self._eom_task_done)
        else:
            self._in_thread(lambda: int(milter.eom()), self._eom_done)

    def _eom_task_done(self, task: asyncio.Task[int]) -> None:
        self.server.tasks.discard(task)
        if task.cancelled():
            self._finished(self._eom_done, None, RuntimeError("end of message cancelled"))
        else:
            error = task.exception()
            self._finished(self._eom_done, None if error else task.result(), error)

    def _eom_done(self, rc: int) -> None:
        edits = self.ctx.edits
        final = self._final(rc)
        edits.append(final)
        self._write(b"".join(edits))
        self._end_message()

    def _end_message(self) -> None:
        self.ctx.edits = []
        self.in_message = self.failed = False

    def _abort(self, data: bytes) -> None:
        if self.milter is not None:
            self.milter.abort()
        self.ctx.drop_message_macros(keep_mail=False)
        self.ctx.reply = None
        self._end_message()

    def _quit(self, data: bytes) -> None:
        self._close_milter()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _quit_nc(self, data: bytes) -> None:
        """QUIT with a new connection to follow on this socket: a fresh milter object."""
        old = self._milter()
        self._close_milter()
        milter = self.server.factory()
        milter._setctx(self.ctx)
        milter._actions, milter._protocol = old._actions, old._protocol
        self.milter = milter
        self.ctx.clear()
        self._end_message()


_HANDLERS: dict[str, Callable[[MilterSession, bytes], None]] = {
    p.OPTNEG: MilterSession._optneg, p.MACRO: MilterSession._macro, p.CONNECT: MilterSession._connect,
    p.HELO: MilterSession._helo, p.MAIL: MilterSession._mail, p.RCPT: MilterSession._rcpt,
    p.DATA: MilterSession._data, p.HEADER: MilterSession._header, p.EOH: MilterSession._eoh,
    p.BODY: MilterSession._body, p.BODYEOB: MilterSession._eom, p.ABORT: MilterSession._abort,
    p.QUIT: MilterSession._quit, p.QUIT_NC: MilterSession._quit_nc, p.UNKNOWN: MilterSession._unknown,
}


class MilterServer:
    """Listens on the milter socket; owns the sessions and the thread pool."""

    def __init__(self, factory: Callable[[], ContentMilter], pool: WorkerPool, *,
                 mta_timeout: float, max_packet: int = p.MAX_PACKET) -> None:
        self.factory = factory
        self.pool = pool
        self.mta_timeout = mta_timeout
        self.max_packet = max_packet
        self.loop = asyncio.get_running_loop()
        self.sessions: set[MilterSession] = set()
        self.tasks: set[asyncio.Task[int]] = set()  # ends of message running on the loop
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._path: Path | None = None

    async def start(self, endpoint: str, socket_mode: int = 0o660) -> None:
        """Listen on ``unix:/path`` (a stale socket file is replaced) or ``inet:host:port``."""
        if endpoint.startswith("unix:"):
            path = Path(endpoint[len("unix:"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.stat().st_mode):
                    path.unlink()
            self._server = await self.loop.create_unix_server(lambda: MilterSession(self), str(path),
                                                              backlog=128)
            path.chmod(socket_mode)
            self._path = path
        else:
            host, _, port = endpoint[len("inet:"):].rpartition(":")
            self._server = await self.loop.create_server(lambda: MilterSession(self), host, int(port),
                                                         backlog=128, reuse_address=True)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections whose MTA has been silent for ``mta_timeout`` (not while we work)."""
        period = max(0.5, min(30.0, self.mta_timeout / 4))
        while True:
            await asyncio.sleep(period)
            limit = self.loop.time() - self.mta_timeout
            for session in list(self.sessions):
                if not session.busy and session.last < limit:
                    session.drop(f"MTA silent for over {self.mta_timeout:g}s")

    async def close(self, grace: float = 10.0) -> None:
        """Stop listening, let running steps answer (up to ``grace`` seconds), then close."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + grace
        while any(s.busy for s in self.sessions) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0)
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()


async def serve(factory: Callable[[], ContentMilter], endpoint: str, *, socket_mode: int,
                threads: int, mta_timeout: float, ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = WorkerPool(loop, threads)
    server = MilterServer(factory, pool, mta_timeout=mta_timeout)
    try:
        await server.start(endpoint, socket_mode)
        log.info("milter listening on %s (asyncio server, %d threads, pid %d)", endpoint, threads,
                 os.getpid())
        if ready is not None:
            ready()
        await stop.wait()
        log.info("milter stopping: %d connection(s)", len(server.sessions))
        await server.close()
    finally:
        await loop.run_in_executor(None, pool.shutdown)


def run_loop(main: Any) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
