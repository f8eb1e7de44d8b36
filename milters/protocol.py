"""The Sendmail milter protocol (version 6, as Postfix speaks it): a pure, incremental codec.

A packet is a 4-byte big-endian length, then that many bytes: a one-byte command and
its data.  :class:`PacketReader` cuts a byte stream into ``(command, data)`` pairs,
many per read, with a bound on the size of one packet; the ``parse_*`` functions
decode the data of the MTA's commands and the ``encode_*`` functions build the
milter's replies.  No I/O here: :mod:`milters.server` drives it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# Commands from the MTA.
OPTNEG = "O"
MACRO = "D"
CONNECT = "C"
HELO = "H"
MAIL = "M"
RCPT = "R"
DATA = "T"
HEADER = "L"
EOH = "N"
BODY = "B"
BODYEOB = "E"
ABORT = "A"
QUIT = "Q"
QUIT_NC = "K"
UNKNOWN = "U"
MTA_COMMANDS = frozenset("ODCHMRTLNBEAQKU")

# Replies from the milter.
CONTINUE = "c"
ACCEPT = "a"
REJECT = "r"
TEMPFAIL = "t"
DISCARD = "d"
SKIP = "s"
REPLYCODE = "y"
ADDHEADER = "h"
INSHEADER = "i"
CHGHEADER = "m"
DELRCPT = "-"
ADDRCPT = "+"
REPLBODY = "b"
PROGRESS = "p"
#: Replies that end a step (the MTA reads modifications until one of these).
FINAL_REPLIES = frozenset("cartdsy")

# Actions the milter may take (SMFIF_*).
ACT_ADDHDRS = 0x01
ACT_CHGBODY = 0x02
ACT_ADDRCPT = 0x04
ACT_DELRCPT = 0x08
ACT_CHGHDRS = 0x10

# Protocol steps the MTA may skip (SMFIP_NO*) or send without waiting for a reply (SMFIP_NR_*).
NO_CONNECT = 0x1
NO_HELO = 0x2
NO_MAIL = 0x4
NO_RCPT = 0x8
NO_BODY = 0x10
NO_HDRS = 0x20
NO_EOH = 0x40
NR_HDR = 0x80
NO_UNKNOWN = 0x100
NO_DATA = 0x200
SKIP_OK = 0x400
RCPT_REJ = 0x800
NR_CONN = 0x1000
NR_HELO = 0x2000
NR_MAIL = 0x4000
NR_RCPT = 0x8000
NR_DATA = 0x10000
NR_UNKN = 0x20000
NR_EOH = 0x40000
NR_BODY = 0x80000
#: The "no reply" bit of each step.
NR_BIT = {CONNECT: NR_CONN, HELO: NR_HELO, MAIL: NR_MAIL, RCPT: NR_RCPT, DATA: NR_DATA,
          UNKNOWN: NR_UNKN, HEADER: NR_HDR, EOH: NR_EOH, BODY: NR_BODY}

VERSION = 6
#: Protocol bits defined by version 6 (the MDS_* size bits above them are not used).
V6_PROTOCOL_MASK = 0x1FFFFF
#: Actions defined by version 6.
V6_ACTIONS_MASK = 0x1FF
#: Largest packet accepted by default: Postfix's body chunks are 64 KiB, a header
#: field at most ``header_size_limit`` (100 KiB by default).
MAX_PACKET = 1024 * 1024

_LEN = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_PORT = struct.Struct(">H")
_INDEX = struct.Struct(">I")
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


class ProtocolError(Exception):
    """The byte stream is not the milter protocol (the connection must be closed)."""


@dataclass(frozen=True)
class Optneg:
    """An option negotiation: protocol version, actions (SMFIF_*), protocol steps (SMFIP_*)."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Connect:
    """The SMTP client as the MTA describes it (family ``4``, ``6``, ``L`` or ``U``)."""

    hostname: str
    family: str
    port: int
    address: str


class PacketReader:
    """Cuts a byte stream into ``(command, data)`` packets; keeps a partial one for the next feed."""

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """The complete packets in what was received so far, in order.

        Raises :class:`ProtocolError` for an empty packet, one over ``max_packet``
        or an unknown command; what follows it in the stream is then meaningless.
        """
        buf = self._buf + data if self._buf else data
        out: list[tuple[str, bytes]] = []
        pos, end = 0, len(buf)
        unpack, limit = _LEN.unpack_from, self.max_packet
        while end - pos >= 5:
            (size,) = unpack(buf, pos)
            if size == 0 or size > limit:
                self._buf = b""
                raise ProtocolError(f"packet of {size} bytes (limit {limit})")
            if end - pos - 4 < size:
                break
            cmd = chr(buf[pos + 4])
            if cmd not in MTA_COMMANDS:
                self._buf = b""
                raise ProtocolError(f"unknown command {cmd!r}")
            out.append((cmd, buf[pos + 5:pos + 4 + size]))
            pos += 4 + size
        self._buf = buf[pos:] if pos < end else b""
        return out


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def split_strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings (the last terminator may be missing)."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


def parse_optneg(data: bytes) -> Optneg:
    """The MTA's SMFIC_OPTNEG data."""
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"option negotiation of {len(data)} bytes")
    return Optneg(*_OPTNEG.unpack_from(data))


def parse_macros(data: bytes) -> tuple[str, dict[str, str]]:
    """SMFIC_MACRO: the command the macros belong to, and name -> value."""
    if not data:
        raise ProtocolError("macro packet without a command")
    items = split_strings(data[1:])
    if len(items) % 2:
        items.append(b"")  # a name without value: libmilter ignores the odd one, keep it empty
    return chr(data[0]), {_text(items[i]): _text(items[i + 1]) for i in range(0, len(items), 2)}


def parse_connect(data: bytes) -> Connect:
    """SMFIC_CONNECT: hostname, family, port and address."""
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ProtocolError("connect without a family")
    family = chr(rest[0])
    if family == "U":
        return Connect(_text(host), family, 0, "")
    if family not in "46L":
        raise ProtocolError(f"connect with family {family!r}")
    if len(rest) < 3:
        raise ProtocolError("connect without a port")
    (port,) = _PORT.unpack_from(rest, 1)
    address = rest[3:].split(b"\0", 1)[0]
    return Connect(_text(host), family, port, _text(address))


def parse_header(data: bytes) -> tuple[str, bytes]:
    """SMFIC_HEADER: the field name and its raw value."""
    name, sep, value = data.partition(b"\0")
    if not sep:
        raise ProtocolError("header without a value")
    if value.endswith(b"\0"):
        value = value[:-1]
    return _text(name), value


def encode(cmd: str, data: bytes = b"") -> bytes:
    """One packet (either direction)."""
    return _LEN.pack(len(data) + 1) + cmd.encode("latin-1") + data


def _z(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape").replace(b"\0", b"") + b"\0"


def encode_optneg(optneg: Optneg, cmd: str = OPTNEG) -> bytes:
    """An option negotiation packet (the MTA's offer or the milter's answer)."""
    return encode(cmd, _OPTNEG.pack(optneg.version, optneg.actions, optneg.protocol))


def encode_replycode(text: str) -> bytes:
    """SMFIR_REPLYCODE: ``550 5.7.1 text`` as the MTA will say it."""
    return encode(REPLYCODE, _z(text))


def encode_addheader(name: str, value: str) -> bytes:
    """SMFIR_ADDHEADER: append a header field."""
    return encode(ADDHEADER, _z(name) + _z(value))


def encode_insheader(index: int, name: str, value: str) -> bytes:
    """SMFIR_INSHEADER: insert a header field at ``index`` (0: first)."""
    return encode(INSHEADER, _INDEX.pack(index) + _z(name) + _z(value))


def encode_chgheader(index: int, name: str, value: str) -> bytes:
    """SMFIR_CHGHEADER: change the index-th (from 1) field called ``name``; empty value deletes."""
    return encode(CHGHEADER, _INDEX.pack(index) + _z(name) + _z(value))


def encode_delrcpt(rcpt: str) -> bytes:
    """SMFIR_DELRCPT: remove an envelope recipient (as given at RCPT)."""
    return encode(DELRCPT, _z(rcpt))


def encode_addrcpt(rcpt: str) -> bytes:
    """SMFIR_ADDRCPT: add an envelope recipient."""
    return encode(ADDRCPT, _z(rcpt))


def encode_replbody(chunk: bytes) -> bytes:
    """SMFIR_REPLBODY: the next chunk of the replacement body."""
    return encode(REPLBODY, chunk)


def reply_text(rcode: str, xcode: str | None, msg: str | None, *lines: str) -> str:
    """The SMTP reply libmilter's smfi_setreply/smfi_setmlreply would send, checked the same way."""
    if len(rcode) != 3 or rcode[0] not in "45" or not rcode.isdigit():
        raise ValueError(f"reply code {rcode!r} is not 4xx or 5xx")
    if xcode is not None and not _ENHANCED.fullmatch(xcode):
        raise ValueError(f"enhanced status code {xcode!r} is not class.subject.detail")
    texts = [msg or "", *lines]
    if any("\r" in t or "\n" in t for t in texts):
        raise ValueError("reply text with a line break")
    x = f"{xcode} " if xcode else ""
    if len(texts) == 1:
        return f"{rcode} {x}{texts[0]}".rstrip(" ")
    return "\r\n".join(f"{rcode}{' ' if i == len(texts) - 1 else '-'}{x}{t}" for i, t in enumerate(texts))
