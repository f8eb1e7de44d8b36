"""The pymilter class: gathers the envelope and the message, hands over, applies the result.

One instance per SMTP connection, driven by libmilter (a thread per connection) or by
mailwarden's own asyncio server (:mod:`milters.aserver`), as ``milter.server`` says.  It
decides nothing itself: recipients' policies come from the resolver at RCPT
time (a directory outage defers just that recipient with 4xx), and at end of
message :meth:`MilterService.process` decides and carries out.  Every callback
answers; an unexpected error becomes a 4xx with one log line, never a crashed
or wedged milter.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import Milter

from mailwarden.address import InvalidAddress
from mailwarden.config import Config
from mailwarden.directory import DirectoryUnavailable
from milters.filters import Envelope
from milters.message import BodySpool, HeaderList, Message, ensure_dir
from milters.service import MilterService
from milters.verdict import Disposition, Recipient

log = logging.getLogger("mailwarden.milter")

MILTER_NAME = "mailwarden"
FLAGS: int = Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.DELRCPT
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
DISCARD: int = Milter.DISCARD
TEMPFAIL: int = Milter.TEMPFAIL
_RESULT = {
    Disposition.ACCEPT: ACCEPT,
    Disposition.REJECT: REJECT,
    Disposition.DISCARD: DISCARD,
    Disposition.TEMPFAIL: TEMPFAIL,
}


F = TypeVar("F", bound=Callable[..., int])
T = TypeVar("T")


class InThread(Protocol):
    """Runs a blocking callable in a worker thread; the loop may await the result."""

    def __call__(self, work: Callable[[], T]) -> asyncio.Future[T]:
        """Start ``work``; its result (or exception) arrives through the future."""
        ...


def _noreply(fn: F) -> F:
    """pymilter's @noreply (the MTA does not wait for the answer), typed."""
    return cast(F, Milter.noreply(fn))


def _raw_bytes(fn: F) -> F:
    """pymilter's @decode("bytes") (values as received, no UTF-8 decoding), typed."""
    return cast(F, Milter.decode("bytes")(fn))


def _unbracket(address: str) -> str:
    text = address.strip()
    return text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text


class ContentMilter(Milter.Base):  # type: ignore[misc]
    """One SMTP connection's worth of messages."""

    def __init__(self, service: MilterService) -> None:
        self.service = service
        self.client_address = ""
        self.client_name = ""
        self.helo = ""
        self.sender: str | None = None
        self.mail_params: tuple[str, ...] = ()
        self.recipients: list[Recipient] = []
        self.headers: HeaderList = []
        self.spool: BodySpool | None = None

    def negotiate(self, opts: list[int]) -> int:
        """Ask the MTA only for the actions used (header and body changes, recipient removal)."""
        result: int = super().negotiate(opts)
        opts[0] = self._actions = opts[0] & FLAGS
        return result

    def _forget_message(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.spool = None
        self.sender = None
        self.recipients = []
        self.headers = []

    @_noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """Remember the client (for logs, XFORWARD and reputation)."""
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            # libmilter passes (ip, port, ...); pymilter's TestCtx passes the bare ip.
            self.client_address = str(hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr)
        self.client_name = hostname or ""
        return CONTINUE

    @_noreply
    def hello(self, heloname: str) -> int:
        """Remember the HELO name."""
        self.helo = heloname or ""
        return CONTINUE

    @_noreply
    def envfrom(self, sender: str, *params: str) -> int:
        """A new message starts."""
        self._forget_message()
        self.sender = _unbracket(sender)
        self.mail_params = tuple(params)
        self.spool = self.service.new_spool()
        return CONTINUE

    def envrcpt(self, to: str, *params: str) -> int:
        """Look up the recipient's policy now: a directory outage defers only this recipient."""
        address = _unbracket(to)
        try:
            policy = self.service.resolver.effective_policy(address)
        except DirectoryUnavailable as exc:
            log.warning("NOQUEUE: defer rcpt <%s>: directory unavailable: %s", address, exc)
            self.setreply("451", "4.3.0", "Recipient policy unavailable; try again later")
            return TEMPFAIL
        except InvalidAddress as exc:
            log.info("NOQUEUE: reject rcpt <%s>: %s", address, exc)
            self.setreply("550", "5.1.3", "Bad recipient address syntax")
            return REJECT
        self.recipients.append(Recipient(address, tuple(params), policy, raw=to))
        return CONTINUE

    @_noreply
    @_raw_bytes
    def header(self, name: str, value: bytes | str) -> int:
        """Keep the header field exactly as received (8-bit junk included)."""
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        self.keep_header(name, raw)
        return CONTINUE

    def keep_header(self, name: str, raw: bytes) -> None:
        """:meth:`header` without pymilter's wrappers (the asyncio server calls it directly)."""
        self.headers.append((name, raw))

    # No eoh(): Milter.Base's is marked @nocallback, so the MTA is asked not to send
    # the end-of-header step at all (two packets and a callback less per message).

    @_noreply
    def body(self, chunk: bytes) -> int:
        """Spool a body chunk (memory, then disk past the limit)."""
        self.keep_body(chunk)
        return CONTINUE

    def keep_body(self, chunk: bytes) -> None:
        """:meth:`body` without pymilter's wrapper (the asyncio server calls it directly)."""
        self._spool().write(chunk)

    def _spool(self) -> BodySpool:
        """This message's body spool (an empty one when no body step came)."""
        if self.spool is None:
            self.spool = self.service.new_spool()
        return self.spool

    def _envelope(self) -> Envelope:
        return Envelope(sender=self.sender or "", queue_id=self.getsymval("i") or "",
                        client_address=self.client_address, client_name=self.client_name,
                        helo=self.helo, mail_params=self.mail_params, receiver=self.getsymval("j") or "")

    def _internal_error(self) -> int:
        """Any surprise at end of message: defer the message, keep the milter serving."""
        log.exception("%s: internal error at end of message; deferred", self.getsymval("i") or "NOQUEUE")
        self.setreply("451", "4.3.0", "Temporary content filter problem; try again later")
        return TEMPFAIL

    def eom(self) -> int:
        """Decide and apply; always answer."""
        try:
            outcome = self.service.process(self._envelope(), self.headers, self._spool(), self.recipients,
                                           self)
            return _RESULT[outcome.disposition]
        except Exception:  # noqa: BLE001 - logged with its traceback, answered with 451
            return self._internal_error()
        finally:
            self._forget_message()

    def eom_on_loop_ready(self) -> bool:
        """Whether :meth:`eom_on_loop` can decide this message without a thread."""
        size = self.spool.size if self.spool is not None else 0
        return self.service.loop_filter_ready(self.recipients, size)

    async def eom_on_loop(self, in_thread: InThread) -> int:
        """:meth:`eom` on the asyncio server's event loop (after :meth:`eom_on_loop_ready`).

        The clamd scan and the spamd score are non-blocking I/O on the loop and the filters
        run there; only carrying out that waits (quarantine, re-injection) goes to
        ``in_thread``, and the reputation write is left to it without waiting.
        """
        service = self.service
        try:
            started = time.monotonic()
            envelope = self._envelope()
            message = Message(self.headers, self._spool(), service.limits)
            decided = await service.decide_on_loop(envelope, message, self.recipients, started)
            if service.finish_waits(decided):
                outcome = await in_thread(lambda: service.finish(decided, self))
            else:
                outcome = service.finish(decided, self)
            kind = service.reputation_kind(decided, outcome)
            if kind is not None:
                address = decided.envelope.client_address
                in_thread(lambda: service.record(address, kind))  # not waited for
            return _RESULT[outcome.disposition]
        except Exception:  # noqa: BLE001 - logged with its traceback, answered with 451
            return self._internal_error()
        finally:
            self._forget_message()

    def abort(self) -> int:
        """The client went away mid-message: drop what was spooled."""
        self._forget_message()
        return CONTINUE

    def close(self) -> int:
        """The connection ended."""
        self._forget_message()
        return CONTINUE


def _prepare_process() -> None:
    """Logging without per-line lookups nobody reads."""
    # The log format names no thread or process: skip looking them up for every line
    # (each libmilter thread is foreign to the threading module).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor the calling function and line: that walks the stack for every line logged.
    logging._srcfile = None


def _freeze_heap() -> None:
    """Everything loaded so far lives as long as the process: keep it out of the cyclic
    garbage collector's scans, which would otherwise walk it again and again under load."""
    gc.collect()
    gc.freeze()


def run(config: Config, service: MilterService) -> None:
    """Serve on ``milter.socket`` with the configured server until SIGTERM/SIGINT."""
    m = config.milter
    ensure_dir(m.spool_dir)
    _prepare_process()
    if m.server == "asyncio":
        from milters.aserver import run_loop, serve

        def ready() -> None:
            service.lines.start(asyncio.get_running_loop())
            _freeze_heap()

        try:
            run_loop(serve(lambda: ContentMilter(service), m.socket, socket_mode=int(m.socket_mode, 8),
                           threads=m.threads, mta_timeout=m.mta_timeout, ready=ready))
        finally:
            service.lines.flush()
            service.close()
    else:
        try:
            run_libmilter(config, service)
        finally:
            service.close()


def run_libmilter(config: Config, service: MilterService) -> None:
    """Serve through pymilter/libmilter (a thread per MTA connection)."""
    m = config.milter
    path: Path | None = None
    if m.socket.startswith("unix:"):
        path = Path(m.socket[len("unix:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
    Milter.factory = lambda: ContentMilter(service)
    Milter.milter.set_flags(FLAGS)
    # Register callbacks as Milter.runmilter does, but open the socket ourselves first,
    # so its permissions can be set before the MTA tries to connect.
    milter = Milter.milter
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(m.socket)
    milter.settimeout(int(m.mta_timeout))
    milter.register(MILTER_NAME, data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)
    milter.opensocket(True)
    if path is not None and stat.S_ISSOCK(path.stat().st_mode):
        path.chmod(int(m.socket_mode, 8))
    log.info("milter listening on %s (libmilter server)", m.socket)
    _freeze_heap()
    milter.main()
