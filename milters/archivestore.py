"""Where archive copies are saved: the archive mailbox's Dovecot, over IMAP or over LMTP.

Both stores take one copy at a time from the archiver (:mod:`milters.archive`) and
return only once Dovecot has taken it, or raise ArchiveUnavailable; both keep their
sessions open between copies, on the event loop.

* :class:`ImapStore` (``[render] archive_imap_port`` set): IMAP sessions per archive
  mailbox (``[milter] archive_imap_sessions``, one by default), logged in by a Dovecot
  master user *as* that mailbox; copies that arrive while a command is out go together
  in the next MULTIAPPEND (group commit).  A fifth or less of Dovecot's CPU per copy
  over LMTP (:mod:`milters.imap`, docs/benchmarks.md).
* :class:`LmtpStore` (the default): a delivery to the archive mailbox over LMTP, one
  transaction per copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from mailwarden.render import HostPort
from milters.imap import ImapClient, ImapError
from milters.lmtp import LmtpClient, LmtpError

log = logging.getLogger("mailwarden.milter")

IDLE_SESSIONS = 8
"""Open LMTP sessions kept per archive host between copies (more are closed after use)."""
BATCH = 50
"""Most copies one MULTIAPPEND carries."""
BATCH_BYTES = 16 * 1024 * 1024
"""Most bytes one MULTIAPPEND carries (a bigger copy goes alone)."""
LANES = 1
"""IMAP sessions per archive mailbox with a command out at the same time (``[milter]
archive_imap_sessions``)."""
IMAP_IDLE_SECONDS = 60.0
"""An archive mailbox's IMAP session unused this long is logged out (Dovecot runs one
imap process per session; only mailboxes with recent mail keep one)."""


class ArchiveUnavailable(Exception):
    """A copy the archive did not take; the message says why."""


class CopyStore(Protocol):
    """Saves archive copies (on the running event loop)."""

    async def save(self, host: str, address: str, data: bytes, sender: str, deadline: float) -> None:
        """Save one copy in ``address``'s archive mailbox on mailbox host ``host`` (a
        ``mail_host`` value) before ``deadline`` (monotonic).  Raises ArchiveUnavailable."""

    async def probe(self, host: str, address: str, timeout: float) -> str:
        """Reach ``address``'s archive mailbox on ``host`` as a copy would, saving
        nothing; what was reached.  Raises ArchiveUnavailable."""

    def close(self) -> None:
        """End every open session."""


def mail_host_endpoint(value: str, default_port: int) -> HostPort:
    """A ``mail_host`` value (``host`` or ``host:port``, an IPv6 address in brackets)."""
    try:
        return HostPort.parse(value)
    except ValueError:
        return HostPort(value.strip().strip("[]"), default_port)


def time_left(timeout: float, deadline: float) -> float:
    """Seconds a step may take: ``timeout``, less when the message's deadline is nearer,
    at least one."""
    return max(1.0, min(timeout, deadline - time.monotonic()))


class LmtpSessions:
    """Idle LMTP sessions per archive host, taken by one copy at a time (on the event loop).

    A copy on an open session saves the milter a connect, LHLO and QUIT (about half its
    CPU per copy: 0.29 against 0.53 ms for a 2 KB message) and Dovecot the start of an
    lmtp process.  A session the server ended while idle (closed, or a 421) is noticed at
    the next copy's first reply, and that copy is sent again on a new one.
    """

    def __init__(self, idle: int = IDLE_SESSIONS) -> None:
        self.idle = idle
        self._sessions: dict[tuple[str, int], list[LmtpClient]] = {}

    def take(self, host: tuple[str, int]) -> LmtpClient | None:
        """An idle session to ``host`` on the running loop, or None (others are dropped)."""
        idle = self._sessions.get(host)
        while idle:
            session = idle.pop()
            if session.usable:
                return session
            session.abort()
        return None

    def give_back(self, host: tuple[str, int], session: LmtpClient) -> None:
        """Keep a session that ended its last transaction cleanly (close it if enough are idle)."""
        idle = self._sessions.setdefault(host, [])
        if len(idle) < self.idle and session.usable:
            idle.append(session)
            return
        session.quit()

    def close(self) -> None:
        """End every idle session."""
        sessions = [s for idle in self._sessions.values() for s in idle]
        self._sessions.clear()
        for session in sessions:
            session.quit()


class LmtpStore:
    """Copies delivered to the archive mailbox over LMTP (the mailbox role's port)."""

    def __init__(self, port: int, timeout: float, name: str) -> None:
        self.port = port
        self.timeout = timeout
        self.name = name or "localhost"
        self.sessions = LmtpSessions()

    async def save(self, host: str, address: str, data: bytes, sender: str, deadline: float) -> None:
        """One LMTP transaction.  A session that ended its transaction with a reply, taken
        or refused, is kept for the next copy; a broken one is closed."""
        endpoint = mail_host_endpoint(host, self.port)
        where = (endpoint.host, endpoint.port)
        said = f"{address} at {endpoint.service}"
        session = self.sessions.take(where)
        try:
            replies = None
            if session is not None:
                try:
                    replies = await session.deliver(sender, [address], data,
                                                    time_left(self.timeout, deadline))
                except LmtpError as exc:
                    if not exc.dropped:
                        raise
                    # Ended by the server while idle: once more on a new session.
                    session = None
            if replies is None:
                session = await LmtpClient.open(endpoint.host, endpoint.port,
                                                time_left(self.timeout, deadline), self.name)
                replies = await session.deliver(sender, [address], data, time_left(self.timeout, deadline))
        except LmtpError as exc:
            if session is not None:
                self.sessions.give_back(where, session)  # closed instead when it broke
            if exc.reply is None:
                raise ArchiveUnavailable(f"{said}: {exc}") from None
            refused = " refused" if exc.stage == "RCPT" else ""
            raise ArchiveUnavailable(f"{said}{refused}: {exc.reply}") from None
        assert session is not None
        self.sessions.give_back(where, session)
        reply = replies[address]
        if not reply.ok:
            raise ArchiveUnavailable(f"{said}: {reply}")

    async def probe(self, host: str, address: str, timeout: float) -> str:
        """LHLO, then MAIL and RCPT for the archive mailbox, then RSET."""
        endpoint = mail_host_endpoint(host, self.port)
        said = f"{address} at {endpoint.service}"
        try:
            session = await LmtpClient.open(endpoint.host, endpoint.port, timeout, self.name)
            try:
                reply = await session.accepts(address, timeout)
            finally:
                session.quit()
        except LmtpError as exc:
            raise ArchiveUnavailable(f"{said}: {exc}") from None
        if not reply.ok:
            raise ArchiveUnavailable(f"{said} refused: {reply}")
        return f"LMTP: {said} accepts copies"

    def close(self) -> None:
        self.sessions.close()


class ImapStore:
    """Copies saved with MULTIAPPEND into each archive mailbox's INBOX, logged in as a
    Dovecot master user (``AUTHENTICATE PLAIN`` with the mailbox as authorization id)."""

    def __init__(self, port: int, user: str, password: str, timeout: float, *,
                 batch: int = BATCH, batch_bytes: int = BATCH_BYTES, lanes: int = LANES,
                 idle_seconds: float = IMAP_IDLE_SECONDS) -> None:
        self.port = port
        self.lanes = lanes
        self.user = user
        self.password = password
        self.timeout = timeout
        self.batch = batch
        self.batch_bytes = batch_bytes
        self.idle_seconds = idle_seconds
        self.mailboxes: dict[tuple[str, str], ArchiveMailbox] = {}
        self.opened = 0
        """Sessions opened so far (a session is one login)."""
        self.commands = 0
        """MULTIAPPEND commands sent so far (each carries one or more copies)."""

    async def save(self, host: str, address: str, data: bytes, sender: str, deadline: float) -> None:
        """Queue the copy for its mailbox's next MULTIAPPEND and wait for Dovecot's answer."""
        key = (mail_host_endpoint(host, self.port).host, address.lower())
        box = self.mailboxes.get(key)
        if box is None or box.loop is not asyncio.get_running_loop():
            if box is not None:
                box.close()
            box = self.mailboxes[key] = ArchiveMailbox(self, key[0], address)
        await box.save(data, deadline)

    async def probe(self, host: str, address: str, timeout: float) -> str:
        """A login as the master user for the archive mailbox, then LOGOUT."""
        endpoint = mail_host_endpoint(host, self.port)
        said = f"{address} at {endpoint.host}:{self.port}"
        try:
            session = await ImapClient.open(endpoint.host, self.port, timeout, login=address, user=self.user,
                                            password=self.password)
        except ImapError as exc:
            raise ArchiveUnavailable(f"{said}: {exc}") from None
        session.logout()
        return f"IMAP: {self.user} logged in for {said}"

    def forget(self, box: ArchiveMailbox) -> None:
        """Drop a mailbox whose session was logged out for being idle."""
        key = (box.host, box.address.lower())
        if self.mailboxes.get(key) is box:
            del self.mailboxes[key]

    def close(self) -> None:
        boxes = list(self.mailboxes.values())
        self.mailboxes.clear()
        for box in boxes:
            box.close()


class ArchiveMailbox:
    """One archive mailbox's IMAP sessions and the copies waiting for them.

    Each session has one command out at a time; copies that arrive while every session
    is busy wait and go together in the next command (up to ``batch`` copies and
    ``batch_bytes``), so under load a command carries about as many copies as messages
    arrived during the last one, and a lone copy waits one round trip.  More than one
    session (``lanes``) overlaps Dovecot's waits for the disk (``mail_fsync``): one
    command is written while another's files are being synced.  MULTIAPPEND is all or
    nothing, so when Dovecot refuses a batch, its copies are sent again one by one: one
    refused copy (one over the mailbox's quota, say) does not fail the others.
    """

    def __init__(self, store: ImapStore, host: str, address: str) -> None:
        self.store = store
        self.host = host
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self.sessions: list[ImapClient] = []
        """Logged-in sessions no command is out on."""
        self.runners: set[asyncio.Task[None]] = set()
        self.idle: asyncio.TimerHandle | None = None
        self.where = f"{address} at {host}:{store.port}"

    async def save(self, data: bytes, deadline: float) -> None:
        """Wait until the copy is saved; ArchiveUnavailable when it was not, in time."""
        done: asyncio.Future[None] = self.loop.create_future()
        item = (data, done)
        self.waiting.append(item)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if len(self.runners) < self.store.lanes:
            runner = self.loop.create_task(self._run())
            self.runners.add(runner)
            runner.add_done_callback(self._ended)
        wait = time_left(self.store.timeout, deadline)
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(done)
        except TimeoutError:
            if item in self.waiting:  # never sent: it will not be
                self.waiting.remove(item)
            done.cancel()
            raise ArchiveUnavailable(f"{self.where}: not saved in {wait:g} s") from None

    async def _run(self) -> None:
        """One lane: commands on one session while copies wait."""
        session: ImapClient | None = None
        while self.sessions and session is None:
            session = self.sessions.pop()
            if not session.usable:
                session.abort()
                session = None
        try:
            while self.waiting:
                session = await self._commit(session, self._take())
        finally:
            if session is not None and session.usable:
                self.sessions.append(session)

    def _ended(self, runner: asyncio.Task[None]) -> None:
        self.runners.discard(runner)
        if not self.runners and not self.waiting and self.sessions and not self.loop.is_closed():
            self.idle = self.loop.call_later(self.store.idle_seconds, self._expire)

    def _take(self) -> list[tuple[bytes, asyncio.Future[None]]]:
        size = 0
        count = 0
        for data, _ in self.waiting:
            if count and (count >= self.store.batch or size + len(data) > self.store.batch_bytes):
                break
            size += len(data)
            count += 1
        batch, self.waiting = self.waiting[:count], self.waiting[count:]
        return batch

    async def _commit(self, session: ImapClient | None,
                      batch: list[tuple[bytes, asyncio.Future[None]]]) -> ImapClient | None:
        """Save ``batch``; the session to go on with (None: it broke)."""
        try:
            session = await self._append(session, [data for data, _ in batch])
        except ImapError as exc:
            if exc.dropped:
                session = None
            if exc.reply is not None and exc.stage == "APPEND" and len(batch) > 1:
                log.warning("archive %s refused a batch of %d copies (%s); saving them one by one",
                            self.where, len(batch), exc.reply)
                for item in batch:
                    session = await self._commit(session, [item])
                return session
            failure = ArchiveUnavailable(f"{self.where}: {exc}")
            for _, done in batch:
                if not done.done():
                    done.set_exception(failure)
            return session
        for _, done in batch:
            if not done.done():
                done.set_result(None)
        return session

    async def _append(self, session: ImapClient | None, messages: list[bytes]) -> ImapClient:
        """Save ``messages`` on ``session`` (a new one when None); the session.

        A session that had been open before and that the server ended meanwhile (logged
        out, restarted) gets the command once more on a new one.
        """
        if session is not None and session.usable:
            self.store.commands += 1
            try:
                await session.append(messages, self.store.timeout)
                return session
            except ImapError as exc:
                if not exc.dropped:
                    raise
        session = await self._open()
        self.store.commands += 1
        await session.append(messages, self.store.timeout)
        return session

    async def _open(self) -> ImapClient:
        session = await ImapClient.open(self.host, self.store.port, self.store.timeout, login=self.address,
                                        user=self.store.user, password=self.store.password)
        self.store.opened += 1
        return session

    def _expire(self) -> None:
        self.idle = None
        if not self.runners and not self.waiting:
            self.close()
            self.store.forget(self)

    def close(self) -> None:
        """Log out; copies still waiting are not saved (their senders see them fail)."""
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        for _, done in self.waiting:
            done.cancel()
        self.waiting.clear()
        for runner in self.runners:
            runner.cancel()
        sessions, self.sessions = self.sessions, []
        for session in sessions:
            if session.usable:
                session.logout()
            else:
                session.abort()
