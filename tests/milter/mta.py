"""The MTA side of the milter protocol for tests, on top of the ``miltertest`` package.

It honours what the milter negotiated the way Postfix does: steps the milter
asked to skip are not sent, steps it asked not to answer are sent without
waiting.  Body and header values may be bytes (8-bit junk is sent as is).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from miltertest import MilterConnection
from miltertest import constants as c

P_NR = {  # protocol bits for "no reply" and "not at all", per step
    c.SMFIC_CONNECT: (0x1000, 0x01),
    c.SMFIC_HELO: (0x2000, 0x02),
    c.SMFIC_MAIL: (0x4000, 0x04),
    c.SMFIC_RCPT: (0x8000, 0x08),
    c.SMFIC_HEADER: (0x80, 0x20),
    c.SMFIC_EOH: (0x40000, 0x40),
    c.SMFIC_BODY: (0x80000, 0x10),
    c.SMFIC_DATA: (0x10000, 0x200),
}


@dataclass
class EomResult:
    """What the milter answered at end of message."""

    final: str
    reply: str = ""
    actions: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def of(self, code: str) -> list[dict[str, object]]:
        return [args for cmd, args in self.actions if cmd == code]


class MtaSession:
    """One connection to the milter, speaking as an MTA."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.conn = MilterConnection(self.sock)
        self.last_reply = ""
        self.actions, self.protocol = self.conn.optneg_mta(strict=False)

    def close(self) -> None:
        self.sock.close()

    def _raw(self, cmd: str, payload: bytes) -> None:
        self.sock.sendall(struct.pack("!Lc", len(payload) + 1, cmd.encode()) + payload)

    def step(self, cmd: str, payload: bytes) -> str | None:
        """Send one step; return the reply code, or None when no reply is due."""
        nr, skip = P_NR.get(cmd, (0, 0))
        if self.protocol & skip:
            return None
        self._raw(cmd, payload)
        if self.protocol & nr:
            return None
        reply = self.conn.recv()
        assert reply is not None
        if reply[0] == c.SMFIR_REPLYCODE:
            self.last_reply = reply_text(reply[1])
        return str(reply[0])

    def connect(self, hostname: str = "client.example", address: str = "192.0.2.10") -> str | None:
        payload = hostname.encode() + b"\0" + b"4" + struct.pack("!H", 2525) + address.encode() + b"\0"
        return self.step(c.SMFIC_CONNECT, payload)

    def helo(self, name: str = "client.example") -> str | None:
        return self.step(c.SMFIC_HELO, name.encode() + b"\0")

    def mail(self, sender: str, *params: str) -> str | None:
        return self.step(c.SMFIC_MAIL, b"".join(a.encode() + b"\0" for a in (f"<{sender}>", *params)))

    def rcpt(self, recipient: str, *params: str) -> str | None:
        return self.step(c.SMFIC_RCPT, b"".join(a.encode() + b"\0" for a in (f"<{recipient}>", *params)))

    def header(self, name: str, value: bytes | str) -> str | None:
        raw = value if isinstance(value, bytes) else value.encode()
        return self.step(c.SMFIC_HEADER, name.encode() + b"\0" + raw + b"\0")

    def eoh(self) -> str | None:
        return self.step(c.SMFIC_EOH, b"")

    def body(self, data: bytes) -> None:
        for off in range(0, len(data), c.MILTER_CHUNK_SIZE):
            code = self.step(c.SMFIC_BODY, data[off:off + c.MILTER_CHUNK_SIZE])
            assert code in (None, c.SMFIR_CONTINUE), code

    def eom(self, queue_id: str = "TESTQ1") -> EomResult:
        self.conn.send_macro(c.SMFIC_BODYEOB, i=queue_id)
        self._raw(c.SMFIC_BODYEOB, b"")
        result = EomResult(final="")
        while True:
            reply = self.conn.recv()
            assert reply is not None
            cmd, args = reply
            if cmd == c.SMFIR_REPLYCODE:
                result.reply = reply_text(args)
            if cmd in (c.SMFIR_ACCEPT, c.SMFIR_CONTINUE, c.SMFIR_REJECT, c.SMFIR_TEMPFAIL,
                       c.SMFIR_DISCARD, c.SMFIR_REPLYCODE):
                result.final = cmd
                return result
            result.actions.append((cmd, args))

    def message(self, sender: str, recipients: list[str], raw: bytes,
                queue_id: str = "TESTQ1") -> EomResult | str:
        """A whole transaction; returns the EOM result, or the refusing step's reply code."""
        self.mail(sender)
        accepted = 0
        for r in recipients:
            code = self.rcpt(r)
            if code not in (None, c.SMFIR_CONTINUE):
                continue
            accepted += 1
        if not accepted:
            return "no recipient"
        self.step(c.SMFIC_DATA, b"")
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        for line in _unfold(head):
            name, _, value = line.partition(b":")
            self.header(name.decode(), value.lstrip(b" \t"))
        self.eoh()
        self.body(body.replace(b"\n", b"\r\n"))
        return self.eom(queue_id)


def reply_text(args: dict[str, object]) -> str:
    """``550 5.7.1 text`` from a decoded SMFIR_REPLYCODE."""
    return f"{args.get('smtpcode', '')} {args.get('text', '')}"


def _unfold(head: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\n" + line
        elif line:
            out.append(line)
    return out
