"""A small SMTP/LMTP server on loopback that records what it receives.

Tests point Postfix at it (``relayhost``, a transport, or an ``lmtp:`` next hop) as
"the Internet" or "the mailbox host" and then assert exactly which message reached
which envelope recipient.  It accepts everything unless told to refuse given
recipients, MAIL FROM or DATA with a given reply.  Standard library only; one thread
per connection.
"""

from __future__ import annotations

import email
import email.policy
import re
import socketserver
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from types import TracebackType

from harness.ports import free_port

__all__ = ["SinkMessage", "SmtpSink"]

_PATH = re.compile(r"^(?:MAIL FROM|RCPT TO):\s*<([^>]*)>(.*)$", re.IGNORECASE)
MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class SinkMessage:
    """One message as delivered: envelope, raw bytes (dot-unstuffed, CRLF) and peer."""

    envelope_sender: str
    recipients: tuple[str, ...]
    data: bytes
    client_address: str
    helo: str
    mail_parameters: str = ""
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> EmailMessage:
        """The data parsed as an email message (modern policy)."""
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg

    def header(self, name: str) -> str | None:
        """The first header ``name`` (decoded), or None."""
        value = self.message[name]
        return None if value is None else str(value)

    def headers(self, name: str) -> list[str]:
        """Every header ``name`` (decoded), top first."""
        return [str(v) for v in self.message.get_all(name, [])]


class SmtpSink:
    """Record mail sent to ``127.0.0.1:port``; use as a context manager or start()/stop().

    ``reject_recipients`` maps a lower-cased address to the full reply it gets at RCPT
    (``{"gone@example.org": "550 5.1.1 no such user"}``); ``sender_reply`` and
    ``data_reply`` replace the reply to every MAIL FROM / end of DATA.  All three
    may be changed while the sink runs.  ``lmtp=True`` speaks LMTP (LHLO, one reply
    per recipient after DATA).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        lmtp: bool = False,
        hostname: str = "sink.mailwarden.test",
        reject_recipients: Mapping[str, str] | None = None,
        sender_reply: str | None = None,
        data_reply: str | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.lmtp = lmtp
        self.hostname = hostname
        self.reject_recipients = {k.lower(): v for k, v in (reject_recipients or {}).items()}
        self.sender_reply = sender_reply
        self.data_reply = data_reply
        self._messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._server: socketserver.ThreadingTCPServer | None = None

    # -- addresses other components use -------------------------------------------------
    @property
    def relayhost(self) -> str:
        """The value for Postfix ``relayhost`` (``[127.0.0.1]:PORT``)."""
        return f"[{self.host}]:{self.port}"

    @property
    def nexthop(self) -> str:
        """A Postfix transport (``smtp:[127.0.0.1]:PORT`` or ``lmtp:inet:127.0.0.1:PORT``)."""
        if self.lmtp:
            return f"lmtp:inet:{self.host}:{self.port}"
        return f"smtp:[{self.host}]:{self.port}"

    # -- what arrived -------------------------------------------------------------------
    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot of every message received so far, oldest first."""
        with self._cond:
            return list(self._messages)

    def messages_for(self, recipient: str) -> list[SinkMessage]:
        """Messages whose envelope names ``recipient`` (case-insensitive)."""
        wanted = recipient.lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.recipients)]

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until at least ``count`` messages arrived; returns them all.

        Raises TimeoutError naming how many did arrive.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink {self.relayhost}: {len(self._messages)} of {count} message(s) "
                        f"after {timeout:g}s"
                    )
                self._cond.wait(left)
            return list(self._messages)

    def _record(self, message: SinkMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> SmtpSink:
        """Listen and serve in background threads."""
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                _Session(sink, self).run()

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        # A short poll interval keeps stop() quick (shutdown waits for one poll).
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"smtpsink-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening (open sessions end with their client)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "LMTP" if self.lmtp else "SMTP"
        return f"SmtpSink({kind} {self.relayhost}, {len(self.messages)} message(s))"


class _Session:
    """One SMTP/LMTP conversation."""

    def __init__(self, sink: SmtpSink, handler: socketserver.StreamRequestHandler) -> None:
        self.sink = sink
        self.rfile = handler.rfile
        self.wfile = handler.wfile
        self.peer = str(handler.client_address[0])
        self.helo = ""
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.mail_parameters = ""
        self.recipients: list[str] = []

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8", "replace") + b"\r\n")
        self.wfile.flush()

    def run(self) -> None:
        self.reply(f"220 {self.sink.hostname} {'LMTP' if self.sink.lmtp else 'ESMTP'} sink")
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            if not self.command(verb, arg, line):
                return

    def command(self, verb: str, arg: str, line: str) -> bool:
        """Answer one command; False ends the session."""
        lmtp = self.sink.lmtp
        if verb == ("LHLO" if lmtp else "EHLO"):
            self.helo = arg
            self._reset()
            for ext in (self.sink.hostname, "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
                self.reply(f"250-{ext}")
            self.reply("250 SIZE 104857600")
        elif verb == "HELO" and not lmtp:
            self.helo = arg
            self._reset()
            self.reply(f"250 {self.sink.hostname}")
        elif verb in ("MAIL", "RCPT"):
            self.envelope(verb, line)
        elif verb == "DATA":
            self.data()
        elif verb == "RSET":
            self._reset()
            self.reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            return False
        else:
            self.reply("502 5.5.2 Error: command not recognized")
        return True

    def envelope(self, verb: str, line: str) -> None:
        match = _PATH.match(line)
        if match is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address> / RCPT TO:<address>")
            return
        address, params = match.group(1), match.group(2).strip()
        if verb == "MAIL":
            if self.sender is not None:
                self.reply("503 5.5.1 Error: nested MAIL command")
            elif self.sink.sender_reply is not None:
                self.reply(self.sink.sender_reply)
            else:
                self.sender, self.mail_parameters = address, params
                self.reply("250 2.1.0 Ok")
            return
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return
        refusal = self.sink.reject_recipients.get(address.lower())
        if refusal is not None:
            self.reply(refusal)
            return
        self.recipients.append(address)
        self.reply("250 2.1.5 Ok")

    def data(self) -> None:
        if not self.recipients:
            self.reply("554 5.5.1 Error: no valid recipients")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        while True:
            raw = self.rfile.readline(MAX_LINE)
            if not raw:
                return
            if raw in (b".\r\n", b".\n"):
                break
            if raw.startswith(b"."):
                raw = raw[1:]
            lines.append(raw.rstrip(b"\r\n") + b"\r\n")
        assert self.sender is not None
        refusal = self.sink.data_reply
        if refusal is None:
            self.sink._record(SinkMessage(
                envelope_sender=self.sender, recipients=tuple(self.recipients), data=b"".join(lines),
                client_address=self.peer, helo=self.helo, mail_parameters=self.mail_parameters,
            ))
        answer = refusal or "250 2.0.0 Ok: queued"
        for _ in self.recipients if self.sink.lmtp else [None]:
            self.reply(answer)
        self._reset()
