"""The content milter application: gathers the envelope and the message, hands over, answers.

One :class:`ContentMilter` per MTA connection, driven by :mod:`milters.server`.  It
decides nothing itself: each recipient's policy comes from the resolver at RCPT time
(a directory outage defers just that recipient with 4xx), and at end of message
:meth:`MilterService.process` decides and carries out.  Every step answers; an
unexpected error becomes a 4xx with one log line, never a crashed or wedged milter.

:func:`run` is ``mailwarden milter run``: bind the socket, drop privileges, then serve
in ``milter.workers`` processes that share it (:mod:`mailwarden.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket

from mailwarden.address import InvalidAddress
from mailwarden.config import Config
from mailwarden.daemon import Daemon, run_daemon, until_stopped
from mailwarden.directory import DirectoryUnavailable
from mailwarden.log import setup_logging
from mailwarden.metrics import Metrics
from mailwarden.policy import AddressKind
from milters.config import MilterConfig
from milters.delivery import Outcome
from milters.filters import Envelope
from milters.message import BodySpool, HeaderList, ensure_dir
from milters.metrics import MilterMetrics
from milters.server import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    TEMPFAIL,
    Client,
    Edits,
    Macros,
    MilterServer,
    Reply,
    unbracket,
)
from milters.service import MilterService, build_service
from milters.verdict import Disposition, Recipient

log = logging.getLogger("mailwarden.milter")

_POLICY_UNAVAILABLE = Reply.refuse("451", "4.3.0", "Recipient policy unavailable; try again later")
_BAD_ADDRESS = Reply.refuse("550", "5.1.3", "Bad recipient address syntax")
_BLOCKED = Reply.refuse("550", "5.7.1", "Sender address rejected: blocked by the recipient")


def reply_of(outcome: Outcome) -> Reply:
    """The answer to the MTA for a carried-out message."""
    if outcome.disposition is Disposition.ACCEPT:
        return ACCEPT
    if outcome.disposition is Disposition.DISCARD:
        return DISCARD
    if outcome.reply:
        rcode, xcode, text = outcome.reply.split(" ", 2)
        return Reply.refuse(rcode, xcode, text)
    return TEMPFAIL


class ContentMilter:
    """One SMTP connection's worth of messages (a :class:`milters.server.MilterApp`)."""

    def __init__(self, service: MilterService, macros: Macros) -> None:
        self.service = service
        self.macros = macros
        self.client = Client("", "")
        self.helo_name = ""
        self.sender: str | None = None
        self.mail_params: tuple[str, ...] = ()
        self.recipients: list[Recipient] = []
        self.headers: HeaderList = []
        self.spool: BodySpool | None = None

    def _forget_message(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.spool = None
        self.sender = None
        self.recipients = []
        self.headers = []

    def connect(self, client: Client) -> None:
        """Remember the client (for logs, XFORWARD and reputation)."""
        self.client = client

    def helo(self, name: str) -> None:
        """Remember the HELO name."""
        self.helo_name = name

    def mail(self, sender: str, params: tuple[str, ...]) -> None:
        """A new message starts."""
        self._forget_message()
        self.sender = sender
        self.mail_params = params
        self.spool = self.service.new_spool()

    async def rcpt(self, recipient: str, params: tuple[str, ...]) -> Reply:
        """Look up the recipient's policy now: a directory outage defers only this recipient."""
        address = unbracket(recipient)
        try:
            policy = await self.service.resolver.lookup(address)
        except DirectoryUnavailable as exc:
            log.warning("NOQUEUE: defer rcpt <%s>: directory unavailable: %s", address, exc)
            self.service.metrics.rcpt_refused.labels("directory").inc()
            return _POLICY_UNAVAILABLE
        except InvalidAddress as exc:
            log.info("NOQUEUE: reject rcpt <%s>: %s", address, exc)
            self.service.metrics.rcpt_refused.labels("bad_address").inc()
            return _BAD_ADDRESS
        blocked = policy.sender_listed("sender_blocklist", self.sender or "")
        if blocked is not None and policy.kind is not AddressKind.ROLE:
            log.info("NOQUEUE: reject rcpt <%s>: sender <%s> in its sender_blocklist (%s)", address,
                     self.sender, blocked)
            return _BLOCKED
        self.recipients.append(Recipient(address, params, policy, raw=recipient))
        return CONTINUE

    def header(self, name: str, value: bytes) -> None:
        """Keep the header field exactly as received (8-bit junk included)."""
        self.headers.append((name, value))

    def body(self, chunk: bytes) -> None:
        """Spool a body chunk (memory, then disk past the limit)."""
        self._spool().write(chunk)

    def _spool(self) -> BodySpool:
        """This message's body spool (an empty one when no body step came)."""
        if self.spool is None:
            self.spool = self.service.new_spool()
        return self.spool

    def envelope(self) -> Envelope:
        """The envelope and connection facts of the message in progress."""
        return Envelope(sender=self.sender or "", queue_id=self.macros.get("i") or "",
                        client_address=self.client.address, client_name=self.client.hostname,
                        helo=self.helo_name, mail_params=self.mail_params,
                        receiver=self.macros.get("j") or "",
                        auth_login=self.macros.get("{auth_authen}") or "")

    async def end_of_message(self, edits: Edits) -> Reply:
        """Decide and carry out; always answer."""
        try:
            outcome = await self.service.process(self.envelope(), self.headers, self._spool(),
                                                 self.recipients, edits)
            return reply_of(outcome)
        except Exception:
            log.exception("%s: internal error at end of message; deferred", self.macros.get("i") or "NOQUEUE")
            self.service.metrics.failed()
            edits.clear()
            return TEMPFAIL
        finally:
            self._forget_message()

    def abort(self) -> None:
        """The client went away mid-message: drop what was spooled."""
        self._forget_message()

    def close(self) -> None:
        """The connection ended."""
        self._forget_message()


def _freeze_heap() -> None:
    """Everything loaded so far lives as long as the process: keep it out of the cyclic
    garbage collector's scans, which would otherwise walk it again and again under load."""
    gc.collect()
    gc.freeze()


async def serve(config: Config, sockets: list[socket.socket]) -> None:
    """Serve on bound sockets until SIGTERM or SIGINT (one worker process)."""
    m = MilterConfig.of(config)
    service = build_service(config, metrics=MilterMetrics(Metrics(on=bool(m.metrics_listen))))
    loop = asyncio.get_running_loop()
    service.lines.start(loop)
    server = MilterServer(lambda macros: ContentMilter(service, macros), mta_timeout=m.mta_timeout)
    watch = loop.create_task(service.watch(lambda: len(server.sessions)))
    try:
        await server.start(sockets)
        log.info("milter listening on %s (%d worker(s), %d threads each)", m.socket, m.workers, m.threads)
        _freeze_heap()
        await until_stopped()
        log.info("milter stopping: %d connection(s)", len(server.sessions))
        await server.close()
        await service.pipeline.aclose()
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        service.lines.flush()
        service.close()


def run(config: Config) -> int:
    """Bind ``milter.socket``, drop privileges, serve until SIGTERM/SIGINT; the exit status."""
    m = MilterConfig.of(config)
    ensure_dir(m.spool_dir)
    # The log format names no thread or process: skip looking them up for every line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    daemon = Daemon("milter", [m.socket], socket_mode=m.socket_mode, socket_group=m.socket_group,
                    user=m.user, group=m.group, workers=m.workers, threads=m.threads,
                    event_loop=m.event_loop, metrics_listen=m.metrics_listen)

    def after_fork() -> None:
        setup_logging(config.general, "milter")

    return run_daemon(daemon, lambda sockets: serve(config, sockets), after_fork=after_fork)
