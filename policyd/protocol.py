"""The Postfix policy delegation protocol: request parsing with limits, reply formatting.

A request is ``name=value`` lines ended by an empty line; the reply is
``action=...`` and an empty line (SMTPD_POLICY_README).  Everything here is pure
and incremental so that it can be fuzzed: :class:`RequestReader` takes bytes as
they arrive and returns complete requests, or :class:`Malformed` for a request
that broke a limit, in the order they were sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

REQUEST_TYPE = "smtpd_access_policy"
STAGES = ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on what one request may hold."""

    max_line_length: int = 4096
    max_request_size: int = 65536
    max_attributes: int = 128


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that was consumed (up to its blank line) but cannot be answered normally."""

    reason: str


class PolicyRequest:
    """One parsed request; attribute values are ``str`` (absent attributes read as ``""``)."""

    __slots__ = ("attrs", "stage")

    def __init__(self, attrs: Mapping[str, str]) -> None:
        self.attrs = dict(attrs)
        self.stage = self.attrs.get("protocol_state", "").upper()
        """The SMTP protocol state (``RCPT``, ``END-OF-MESSAGE``, ...)."""

    def __getitem__(self, name: str) -> str:
        return self.attrs.get(name, "")

    def __repr__(self) -> str:
        return f"PolicyRequest({self.attrs!r})"

    @property
    def client_address(self) -> str:
        """The SMTP client's IP address."""
        return self.attrs.get("client_address", "")

    @property
    def sender(self) -> str:
        """The envelope sender as given (empty for the null sender)."""
        return self.attrs.get("sender", "")

    @property
    def recipient(self) -> str:
        """The envelope recipient of this RCPT (empty outside RCPT)."""
        return self.attrs.get("recipient", "")

    @property
    def sasl_username(self) -> str:
        """The SMTP AUTH login, or empty."""
        return self.attrs.get("sasl_username", "")

    @property
    def instance(self) -> str:
        """Postfix's identifier of this mail transaction."""
        return self.attrs.get("instance", "")

    def number(self, name: str) -> int:
        """An integer attribute (``size``, ``recipient_count``); 0 when absent or junk."""
        text = self.attrs.get(name, "")
        return int(text) if text.isdigit() and len(text) < 19 else 0


def validate(request: PolicyRequest) -> str | None:
    """Why a syntactically fine request cannot be served, or None."""
    kind = request["request"]
    if kind != REQUEST_TYPE:
        return f"unsupported request type {kind[:64]!r}" if kind else "no request attribute"
    if request.stage not in STAGES:
        stage = request["protocol_state"]
        return f"unknown protocol_state {stage[:64]!r}" if stage else "no protocol_state attribute"
    return None


class RequestReader:
    """Incremental parser for one connection.

    ``feed(data)`` returns the requests (or :class:`Malformed`) completed by
    ``data``.  A request over a limit is discarded up to its terminating blank line,
    so memory stays bounded by ``max_request_size``.  ``discarded`` counts bytes
    thrown away in the current over-limit request; callers may close a connection
    that never ends one.
    """

    __slots__ = ("_buf", "_discarding", "_why", "discarded", "limits")

    def __init__(self, limits: RequestLimits | None = None) -> None:
        self.limits = limits or RequestLimits()
        self._buf = b""
        self._discarding = False
        self._why = ""
        self.discarded = 0

    def reset(self) -> None:
        """Forget any unfinished request (the connection is being closed)."""
        self._buf = b""
        self._discarding = False
        self.discarded = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished request held (or being discarded)."""
        return len(self._buf) + self.discarded

    def feed(self, data: bytes) -> list[PolicyRequest | Malformed]:
        """Consume ``data``; return the requests it completed, in order."""
        out: list[PolicyRequest | Malformed] = []
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Postfix sends bare LF; tolerate CRLF from hand-made clients.
            buf = buf.replace(b"\r\n", b"\n")
        limit = self.limits.max_request_size
        while buf:
            if self._discarding:
                end = self._blank_line(buf)
                if end < 0:
                    # Keep a trailing LF: it may be the first half of the terminator.
                    keep = 1 if buf.endswith(b"\n") else 0
                    self.discarded += len(buf) - keep
                    buf = buf[len(buf) - keep :]
                    break
                self.discarded += end
                buf = buf[end:]
                self._discarding = False
                self.discarded = 0
                out.append(Malformed(self._why))
                continue
            if buf[0:1] == b"\n":
                # An empty line between requests (or an empty request): skip it.
                buf = buf[1:]
                continue
            end = buf.find(b"\n\n")
            if end < 0:
                if len(buf) > limit:
                    self._start_discard(f"request longer than {limit} bytes")
                    continue
                break
            if end + 2 > limit:
                self._start_discard(f"request longer than {limit} bytes")
                continue
            block, buf = buf[:end], buf[end + 2 :]
            out.append(self._parse(block))
        self._buf = buf
        return out

    def _start_discard(self, why: str) -> None:
        self._discarding = True
        self._why = why

    @staticmethod
    def _blank_line(buf: bytes) -> int:
        """Offset just past the first blank line, or -1."""
        end = buf.find(b"\n\n")
        return -1 if end < 0 else end + 2

    def _parse(self, block: bytes) -> PolicyRequest | Malformed:
        """One request; well-formed ones take the fast path, anything odd the strict one."""
        limits = self.limits
        if len(block) <= limits.max_line_length and block.count(b"\n") < limits.max_attributes:
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError:
                return self._parse_strict(block)
            try:
                attrs = dict(line.split("=", 1) for line in text.split("\n"))
            except ValueError:  # a line without "="
                return self._parse_strict(block)
            ascii_names = text.isascii() or all(map(str.isascii, attrs))
            if "" in attrs or max(map(len, attrs)) > 64 or not ascii_names:
                return self._parse_strict(block)
            return PolicyRequest(attrs)
        return self._parse_strict(block)

    def _parse_strict(self, block: bytes) -> PolicyRequest | Malformed:
        """Line by line, naming the first problem."""
        limits = self.limits
        lines = block.split(b"\n")
        if len(lines) > limits.max_attributes:
            return Malformed(f"more than {limits.max_attributes} attributes")
        attrs: dict[str, str] = {}
        for line in lines:
            if len(line) > limits.max_line_length:
                return Malformed(f"attribute line longer than {limits.max_line_length} bytes")
            name, eq, value = line.partition(b"=")
            if not eq or not name or len(name) > 64:
                return Malformed(f"line without name=value: {_preview(line)}")
            try:
                attrs[name.decode("ascii")] = value.decode("utf-8")
            except UnicodeDecodeError:
                return Malformed(f"attribute {_preview(name)} is not UTF-8")
        return PolicyRequest(attrs)


def _preview(raw: bytes) -> str:
    """A short, printable rendering of untrusted bytes for log lines."""
    text = raw[:48].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(raw) > 48 else ""))


def format_reply(action: str) -> bytes:
    """The reply block for ``action`` (newlines and NULs in the text are flattened)."""
    if "\n" in action or "\r" in action or "\x00" in action:
        action = action.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    return b"action=" + action.encode("utf-8", "replace") + b"\n\n"


def format_request(attrs: Mapping[str, str]) -> bytes:
    """A request block (used by the CLI ``query`` command, the benchmark and tests)."""
    body = "".join(f"{k}={v}\n" for k, v in attrs.items())
    return (body + "\n").encode("utf-8")


def iter_actions(data: bytes) -> Iterator[str]:
    """The actions in a stream of reply blocks (client side)."""
    for block in data.split(b"\n\n"):
        if block.startswith(b"action="):
            yield block[7:].decode("utf-8", "replace")
