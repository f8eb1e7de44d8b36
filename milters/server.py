"""The milter protocol server: one asyncio loop for every MTA connection of a process.

Three layers, as in purepythonmilter: :mod:`milters.protocol` cuts and builds packets
(no I/O); :class:`MilterSession` here keeps one MTA connection's order of steps,
its macros and the modifications to send, and calls the application; the
application (:class:`MilterApp`, in production :class:`milters.app.ContentMilter`)
is plain async code with typed callbacks and never sees a packet.

Each socket is read in large chunks and many packets are cut per read.  The steps the
MTA expects an answer for and that may wait (RCPT, end of message) are coroutines; while
one runs, the connection's later packets wait their turn and other connections go on.
Every failure gets one log line and a defined answer: a tempfail where the MTA waits
for one, else the connection is closed (and Postfix applies ``milter_default_action``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from mailwarden.daemon import IdleSweeper
from milters import protocol as p

log = logging.getLogger("mailwarden.milter")

#: Macro stages searched by :meth:`Macros.get`, the latest first.
_STAGES = "ENLTRMHC"
#: Stages whose macros belong to one message (dropped when the next one starts).
_MESSAGE_STAGES = "RTLNBE"
#: Packets held for a connection whose step is running before reading pauses.
_BACKLOG = 64


@dataclass(frozen=True)
class Reply:
    """The answer to a step: continue, accept, discard, or reject / tempfail with SMTP text."""

    code: str
    """A protocol reply (:data:`milters.protocol.CONTINUE`, ``ACCEPT``, ``DISCARD``,
    ``REJECT``, ``TEMPFAIL``)."""
    text: str = ""
    """``550 5.7.1 ...`` for a reject or tempfail (empty: the MTA's own wording)."""

    @classmethod
    def refuse(cls, rcode: str, xcode: str, msg: str) -> Reply:
        """A reject (5xx) or tempfail (4xx) with this SMTP reply (checked as libmilter does)."""
        return cls(p.REJECT if rcode.startswith("5") else p.TEMPFAIL, p.reply_text(rcode, xcode, msg))

    def encode(self) -> bytes:
        """The packet that carries this reply."""
        return p.encode_replycode(self.text) if self.text else p.encode(self.code)


CONTINUE = Reply(p.CONTINUE)
ACCEPT = Reply(p.ACCEPT)
DISCARD = Reply(p.DISCARD)
TEMPFAIL = Reply.refuse("451", "4.3.0", "Temporary content filter problem; try again later")
_ERROR = TEMPFAIL.encode()
_CONTINUE = CONTINUE.encode()


@dataclass(frozen=True)
class Client:
    """The SMTP client as the MTA describes it at connect."""

    hostname: str
    address: str
    """The IP address (empty for a unix or unknown family)."""
    port: int = 0


class Macros:
    """The MTA's macros of one connection, by stage; parsed only when a value is asked for."""

    __slots__ = ("parsed", "raw")

    def __init__(self) -> None:
        self.raw: dict[str, bytes] = {}
        self.parsed: dict[str, dict[str, str]] = {}

    def keep(self, data: bytes) -> None:
        """Keep a macro packet's data for its stage (replacing the stage's earlier one)."""
        stage = chr(data[0])
        self.raw[stage] = data
        self.parsed.pop(stage, None)

    def get(self, name: str) -> str | None:
        """A macro's value, the latest stage first (``i`` also finds ``{i}`` and the other way round)."""
        other = name[1:-1] if name.startswith("{") and name.endswith("}") else f"{{{name}}}"
        # A stage whose raw data holds neither ``name\0`` nor ``name}\0`` is not parsed.
        bare = (other if name.startswith("{") else name).encode("utf-8", "surrogateescape")
        plain, braced = bare + b"\0", bare + b"}\0"
        for stage in _STAGES:
            raw = self.raw.get(stage)
            if raw is None or len(raw) < 2:
                continue
            if stage not in self.parsed and plain not in raw and braced not in raw:
                continue
            values = self.parsed.get(stage)
            if values is None:
                values = self.parsed[stage] = p.parse_macros(raw)[1]
            found = values.get(name, values.get(other))
            if found is not None:
                return found
        return None

    def drop_message(self, keep_mail: bool) -> None:
        """Forget the macros of the message that ended (and of MAIL unless it just arrived)."""
        for stage in _MESSAGE_STAGES if keep_mail else "M" + _MESSAGE_STAGES:
            self.raw.pop(stage, None)
            self.parsed.pop(stage, None)

    def clear(self) -> None:
        """Forget every macro (a new SMTP connection follows)."""
        self.raw.clear()
        self.parsed.clear()


class Edits:
    """The end-of-message modifications, encoded as they are asked for and sent before the reply."""

    __slots__ = ("packets",)

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def clear(self) -> None:
        """Forget the modifications asked for so far (the message is refused after all)."""
        self.packets.clear()

    def addheader(self, name: str, value: str) -> None:
        """Append a header field."""
        self.packets.append(p.encode_addheader(name, value))

    def insheader(self, index: int, name: str, value: str) -> None:
        """Insert a header field at ``index`` (0: above every other)."""
        self.packets.append(p.encode_insheader(index, name, value))

    def chgheader(self, name: str, index: int, value: str) -> None:
        """Change the index-th (from 1) field called ``name``; an empty value deletes it."""
        self.packets.append(p.encode_chgheader(index, name, value))

    def delrcpt(self, rcpt: str) -> None:
        """Remove an envelope recipient (as given at RCPT)."""
        self.packets.append(p.encode_delrcpt(rcpt))

    def replacebody(self, chunks: Iterable[bytes]) -> None:
        """Replace the body with ``chunks`` (sent in packets of at most 64 KiB)."""
        for chunk in chunks:
            for off in range(0, len(chunk), 65535):
                self.packets.append(p.encode_replbody(chunk[off:off + 65535]))


class MilterApp(Protocol):
    """What a milter application implements: one object per MTA connection.

    The steps without an answer are plain methods; RCPT and end of message are
    coroutines answering with a :class:`Reply`.  An exception in any step is logged and
    answered with a tempfail (or the connection is closed where no answer is due).
    """

    def connect(self, client: Client) -> None:
        """A new SMTP client."""
        ...

    def helo(self, name: str) -> None:
        """The HELO/EHLO name."""
        ...

    def mail(self, sender: str, params: tuple[str, ...]) -> None:
        """MAIL FROM (brackets removed) and its ESMTP parameters: a new message starts."""
        ...

    async def rcpt(self, recipient: str, params: tuple[str, ...]) -> Reply:
        """RCPT TO as given (with brackets): accept (CONTINUE) or refuse this recipient."""
        ...

    def header(self, name: str, value: bytes) -> None:
        """One header field, its value exactly as received."""
        ...

    def body(self, chunk: bytes) -> None:
        """The next body chunk."""
        ...

    async def end_of_message(self, edits: Edits) -> Reply:
        """Decide the message; modifications go to ``edits``."""
        ...

    def abort(self) -> None:
        """The message in progress was abandoned."""
        ...

    def close(self) -> None:
        """The connection ended."""
        ...


AppFactory = Callable[[Macros], MilterApp]
"""Makes the application object of a new connection, given the connection's macros."""

#: Steps this milter wants: no EOH, DATA or unknown commands; no reply to connect, HELO,
#: MAIL, headers and body (RCPT is answered: a recipient's policy may be unavailable).
WANTED_PROTOCOL = (p.NO_EOH | p.NO_DATA | p.NO_UNKNOWN | p.SKIP_OK
                   | p.NR_CONN | p.NR_HELO | p.NR_MAIL | p.NR_HDR | p.NR_BODY)
WANTED_ACTIONS = p.ACT_ADDHDRS | p.ACT_CHGHDRS | p.ACT_CHGBODY | p.ACT_DELRCPT


class MilterSession(asyncio.Protocol):
    """One MTA connection: negotiation, then the steps of each message, in order."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.reader = p.PacketReader(server.max_packet)
        self.macros = Macros()
        self.app: MilterApp | None = None
        self.protocol = 0
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[str, bytes]] = deque()
        self.busy = False  # a step's coroutine runs; later packets wait
        self.closed = False
        self.paused = False
        self.in_message = False
        self.failed = False  # a step without reply failed: defer at the next answer
        self.last = time.monotonic()

    @property
    def idle_since(self) -> float | None:
        """When the MTA last sent something, or None while a step runs."""
        return None if self.busy else self.last

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start reading."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        """Cut packets and run them (unless a step is still running)."""
        self.last = time.monotonic()
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

    def connection_lost(self, exc: Exception | None) -> None:
        """Abort the message in progress and close the application (once its step is done)."""
        self.closed = True
        self.server.sessions.discard(self)
        self.pending.clear()
        if not self.busy:
            self._close_app()

    def drop(self, reason: str) -> None:
        """Close the connection with one log line (a protocol violation, a silent MTA)."""
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

    def _answer(self, reply: Reply) -> None:
        self._write(_ERROR if self.failed else reply.encode())

    def _no_reply(self, cmd: str) -> None:
        """Answer CONTINUE to a step, or nothing where the MTA agreed to no reply."""
        if not self.protocol & p.NR_BIT.get(cmd, 0):
            self._write(_ERROR if self.failed else _CONTINUE)

    def _step_failed(self, cmd: str) -> None:
        """A step raised: tempfail if the MTA waits for an answer, else defer at the next one."""
        if cmd in (p.OPTNEG, p.ABORT, p.QUIT, p.QUIT_NC, p.MACRO) or self.app is None:
            self.drop(f"command {cmd!r} could not be handled")
        elif self.protocol & p.NR_BIT.get(cmd, 0):
            self.failed = True
        else:
            self._write(_ERROR)

    def _run(self, step: Coroutine[Any, Any, bytes]) -> None:
        """Run an answering step; the connection's later packets wait until it has answered."""
        self.busy = True
        task = self.server.loop.create_task(step)
        self.server.tasks.add(task)
        task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[bytes]) -> None:
        self.server.tasks.discard(task)
        self.busy = False
        self.last = time.monotonic()
        if self.closed:
            self._close_app()
            return
        if task.cancelled():
            self._write(_ERROR)
        elif (error := task.exception()) is not None:
            log.error("milter step failed; deferring", exc_info=error)
            self._write(_ERROR)
        else:
            self._write(task.result())
        self._drain()

    def _app(self) -> MilterApp:
        if self.app is None:
            raise p.ProtocolError("command before option negotiation")
        return self.app

    def _close_app(self) -> None:
        app, self.app = self.app, None
        if app is None:
            return
        try:
            if self.in_message:
                app.abort()
            app.close()
        except Exception:
            log.exception("milter close failed")
        self.in_message = False

    # ------------------------------------------------------------ the steps

    def _optneg(self, data: bytes) -> None:
        if self.app is not None:
            raise p.ProtocolError("second option negotiation")
        offer = p.parse_optneg(data)
        if offer.version < 2:
            raise p.ProtocolError(f"MTA speaks milter protocol version {offer.version}")
        self.app = self.server.factory(self.macros)
        self.protocol = offer.protocol & WANTED_PROTOCOL
        actions = offer.actions & WANTED_ACTIONS
        self._write(p.encode_optneg(p.Optneg(min(offer.version, p.VERSION), actions, self.protocol)))

    def _macro(self, data: bytes) -> None:
        if not data:
            raise p.ProtocolError("macro packet without a command")
        self.macros.keep(data)

    def _connect(self, data: bytes) -> None:
        c = p.parse_connect(data)
        address = c.address[5:] if c.address.startswith("IPv6:") else c.address
        self._app().connect(Client(c.hostname, address if c.family in "46" else "", c.port))
        self._no_reply(p.CONNECT)

    def _helo(self, data: bytes) -> None:
        args = p.split_strings(data)
        self._app().helo(_text(args[0]) if args else "")
        self._no_reply(p.HELO)

    def _mail(self, data: bytes) -> None:
        sender, params = _address_and_params(data, "MAIL without a sender")
        app = self._app()
        self.macros.drop_message(keep_mail=True)
        self.in_message, self.failed = True, False
        app.mail(unbracket(sender), params)
        self._no_reply(p.MAIL)

    def _rcpt(self, data: bytes) -> None:
        recipient, params = _address_and_params(data, "RCPT without a recipient")
        app = self._app()
        if self.failed:
            self._answer(TEMPFAIL)
            return
        self._run(_encoded(app.rcpt(recipient, params)))

    def _data(self, data: bytes) -> None:
        self._no_reply(p.DATA)

    def _header(self, data: bytes) -> None:
        name, value = p.parse_header(data)
        self._app().header(name, value)
        self._no_reply(p.HEADER)

    def _eoh(self, data: bytes) -> None:
        self._no_reply(p.EOH)

    def _body(self, data: bytes) -> None:
        self._app().body(data)
        self._no_reply(p.BODY)

    def _unknown(self, data: bytes) -> None:
        self._no_reply(p.UNKNOWN)

    def _eom(self, data: bytes) -> None:
        app = self._app()
        if data:
            app.body(data)  # data with the end of body is its last chunk
        if self.failed:
            log.warning("%s: deferred after an earlier failed step", self.macros.get("i") or "NOQUEUE")
            app.abort()
            self._end_message()
            self._write(_ERROR)
            return
        self._run(self._end_of_message(app))

    async def _end_of_message(self, app: MilterApp) -> bytes:
        edits = Edits()
        try:
            reply = await app.end_of_message(edits)
        finally:
            self._end_message()
        edits.packets.append(reply.encode())
        return b"".join(edits.packets)

    def _end_message(self) -> None:
        self.in_message = self.failed = False

    def _abort(self, data: bytes) -> None:
        if self.app is not None and self.in_message:
            self.app.abort()
        self.macros.drop_message(keep_mail=False)
        self._end_message()

    def _quit(self, data: bytes) -> None:
        self._close_app()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _quit_nc(self, data: bytes) -> None:
        """QUIT with a new connection to follow on this socket: a fresh application object."""
        self._app()
        self._close_app()
        self.macros.clear()
        self.app = self.server.factory(self.macros)
        self._end_message()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _address_and_params(data: bytes, missing: str) -> tuple[str, tuple[str, ...]]:
    """MAIL's or RCPT's address (as given) and its ESMTP parameters."""
    args = p.split_strings(data)
    if not args:
        raise p.ProtocolError(missing)
    return _text(args[0]), tuple(_text(a) for a in args[1:])


def unbracket(address: str) -> str:
    """An address without its angle brackets."""
    text = address.strip()
    return text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text


async def _encoded(step: Coroutine[Any, Any, Reply]) -> bytes:
    return (await step).encode()


_HANDLERS: dict[str, Callable[[MilterSession, bytes], None]] = {
    p.OPTNEG: MilterSession._optneg, p.MACRO: MilterSession._macro, p.CONNECT: MilterSession._connect,
    p.HELO: MilterSession._helo, p.MAIL: MilterSession._mail, p.RCPT: MilterSession._rcpt,
    p.DATA: MilterSession._data, p.HEADER: MilterSession._header, p.EOH: MilterSession._eoh,
    p.BODY: MilterSession._body, p.BODYEOB: MilterSession._eom, p.ABORT: MilterSession._abort,
    p.QUIT: MilterSession._quit, p.QUIT_NC: MilterSession._quit_nc, p.UNKNOWN: MilterSession._unknown,
}


class MilterServer:
    """Serves the milter protocol on listening sockets; owns the sessions of this process."""

    def __init__(self, factory: AppFactory, *, mta_timeout: float, max_packet: int = p.MAX_PACKET) -> None:
        self.factory = factory
        self.mta_timeout = mta_timeout
        self.max_packet = max_packet
        self.loop = asyncio.get_running_loop()
        self.sessions: set[MilterSession] = set()
        self.tasks: set[asyncio.Task[bytes]] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.sweeper = IdleSweeper(self.sessions, mta_timeout, peer="MTA")

    async def start(self, sockets: Iterable[socket.socket]) -> None:
        """Serve on bound, listening sockets (shared with the other workers)."""
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await self.loop.create_unix_server(lambda: MilterSession(self), sock=sock)
            else:
                server = await self.loop.create_server(lambda: MilterSession(self), sock=sock)
            self.servers.append(server)
        self.sweeper.start()

    async def close(self, grace: float = 10.0) -> None:
        """Stop listening, let running steps answer (up to ``grace`` seconds), then close."""
        for server in self.servers:
            server.close()
        self.sweeper.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
