"""One parse of one message: parts, attachment names, archive members, decoded text.

The body is collected by :class:`BodySpool` (in memory up to a limit, then in an
unlinked temporary file that is memory-mapped), so a huge message costs bounded
memory.  :class:`Message` parses the MIME structure lazily and only once, by
offsets into that buffer: nothing is copied until a filter asks for a part's
decoded bytes or text.  Every input parses: broken structure becomes a leaf
part plus a note in ``problems``; limits that stop the parse become
:class:`Unscannable` reasons with a defined verdict upstream.
"""

from __future__ import annotations

import binascii
import hashlib
import mmap
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.utils import collapse_rfc2231_value
from pathlib import Path
from typing import BinaryIO

from milters.text import decode_bytes, decode_header_value, guess_decode, html_to_text

Buffer = bytes | mmap.mmap
HeaderList = list[tuple[str, bytes]]

MAX_PART_HEADER = 64 * 1024
"""A part's header block longer than this is taken to have no body."""
SNIFF_BYTES = 1024

_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;\s]*)')
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/=]+")
_EXT_JUNK = re.compile(r"[\s.\x00]+$")


@dataclass(frozen=True)
class Unscannable:
    """Why a message cannot be vouched for, and which checks that defeats."""

    reason: str
    virus: bool
    """The virus scanner cannot see all of the content."""
    listing: bool
    """The attachment listing (extension filter) is incomplete."""


@dataclass
class Limits:
    """Per-message limits of the parse and of unpacking archives."""

    max_parts: int = 1000
    max_depth: int = 20
    archive_max_depth: int = 4
    archive_max_members: int = 2000
    archive_max_size: int = 100 * 1024 * 1024
    archive_max_ratio: int = 100
    memory_limit: int = 1024 * 1024
    spool_dir: str | None = None


# ---------------------------------------------------------------- the body spool


class BodySpool:
    """The message body as it arrives from the MTA: memory up to a limit, then a temp file.

    The file is created unlinked (nothing is left behind by a crash) and read back
    through ``mmap``, so parsing a huge message does not copy it into memory.
    """

    def __init__(self, memory_limit: int = 1024 * 1024, spool_dir: str | None = None) -> None:
        self.memory_limit = memory_limit
        self.spool_dir = spool_dir
        self.size = 0
        # The chunks as the MTA sent them, joined once at the end: most bodies come in
        # one chunk, which is then used as it is, without a copy.
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None
        self._frozen: bytes | None = None

    @property
    def on_disk(self) -> bool:
        """Whether the body spilled to a temporary file."""
        return self._file is not None

    def write(self, chunk: bytes) -> None:
        """Append a chunk of the body."""
        if self._frozen is not None:
            # Written to after being read: start over from what was read.
            self._chunks = [self._frozen]
            self._frozen = None
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._chunks.append(bytes(chunk))
        if self.size > self.memory_limit:
            # Lives until close(): the body is read back after the last chunk.
            self._file = tempfile.TemporaryFile(prefix="mw-body-", dir=self.spool_dir)  # noqa: SIM115
            self._file.writelines(self._chunks)
            self._chunks = []

    def buffer(self) -> Buffer:
        """The whole body, as bytes or a read-only memory map."""
        if self._file is None:
            if self._frozen is None:
                self._frozen = b"".join(self._chunks)
                self._chunks = []
            return self._frozen
        if self._map is None:
            self._file.flush()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def close(self) -> None:
        """Release memory, the map and the temporary file."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunks = []
        self._frozen = None


# ---------------------------------------------------------------- headers


def parse_header_block(block: bytes) -> HeaderList:
    """Split a raw header block into (name, raw value) pairs; folding is kept as LF + blank."""
    headers: HeaderList = []
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if headers:
                last_name, last_value = headers[-1]
                headers[-1] = (last_name, last_value + b"\n" + line)
            continue
        raw_name, sep, value = line.partition(b":")
        if not sep or not raw_name.strip():
            continue
        headers.append((raw_name.strip().decode("ascii", "replace"), value.lstrip(b" \t")))
    return headers


RESERVED_HEADER_PREFIXES = ("x-spam-", "x-mailwarden-")
"""Header fields only mailwarden may set: the spam filter's ``X-Spam-*`` and its own
``X-Mailwarden-*`` (the junk mark Sieve files by among them).  Copies arriving from
outside are removed for every recipient."""


def reserved_header_names(headers: HeaderList) -> list[str]:
    """The names of the fields in ``headers`` that only mailwarden may set, each once."""
    names: dict[str, str] = {}
    for name, _ in headers:
        if name.lower().startswith(RESERVED_HEADER_PREFIXES):
            names.setdefault(name.lower(), name)
    return list(names.values())


def header_value(headers: HeaderList, name: str) -> bytes | None:
    """The raw value of the first header called ``name`` (case-insensitive)."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def parse_content_header(raw: bytes | None) -> tuple[str, dict[str, str]]:
    """A Content-Type / Content-Disposition value as (lower-cased value, parameters).

    The common forms are parsed directly; RFC 2231 parameters (``name*=``) go
    through the standard library, which joins continuations and decodes charsets.
    """
    if raw is None:
        return "", {}
    text = raw.decode("utf-8", "surrogateescape").replace("\n", " ")
    main, _, rest = text.partition(";")
    value = main.strip().lower()
    if "*" in rest:
        msg = EmailMessage()
        msg["X"] = text
        params: dict[str, str] = {}
        for key, val in (msg.get_params(header="X", unquote=True) or [])[1:]:
            params[key.lower()] = collapse_rfc2231_value(val, errors="replace")
        return value, params
    params = {}
    for key, found in _PARAM.findall(";" + rest):
        val = found
        if val.startswith('"'):
            val = val[1:-1] if val.endswith('"') and len(val) > 1 else val[1:]
            val = val.replace('\\"', '"').replace("\\\\", "\\")
        params.setdefault(key.lower(), val)
    return value, params


def _param_text(value: str) -> str:
    """A parameter value as text: 8-bit bytes guessed, encoded-words decoded."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return decode_header_value(value)
    return decode_header_value(raw)


# ---------------------------------------------------------------- parts


@dataclass
class Part:
    """A leaf of the MIME tree, by offsets into the body buffer."""

    index: int
    path: str
    depth: int
    headers: HeaderList
    content_type: str
    params: dict[str, str]
    transfer_encoding: str
    disposition: str
    filenames: tuple[str, ...]
    start: int
    """Where the part begins, its own header block included."""
    body_start: int
    end: int
    is_top: bool = False
    """The message itself is this leaf (a single-part message): its headers are the message's."""

    @property
    def charset(self) -> str | None:
        """The declared charset, if any."""
        return self.params.get("charset")

    @property
    def is_text(self) -> bool:
        """A text part meant to be read (not an attached file)."""
        return self.content_type.startswith("text/") and self.disposition != "attachment" and (
            not self.filenames or self.content_type in ("text/plain", "text/html")
        )

    @property
    def encoded_size(self) -> int:
        """Bytes of the encoded body."""
        return self.end - self.body_start


def _part_info(
    headers: HeaderList, default_type: str
) -> tuple[str, dict[str, str], str, str, tuple[str, ...]]:
    ctype, params = parse_content_header(header_value(headers, "Content-Type"))
    if "/" not in ctype:
        ctype = default_type
    disposition, dparams = parse_content_header(header_value(headers, "Content-Disposition"))
    cte_raw = header_value(headers, "Content-Transfer-Encoding")
    cte = cte_raw.decode("ascii", "replace").strip().lower() if cte_raw else ""
    names: list[str] = []
    for raw in (dparams.get("filename"), params.get("name")):
        if raw:
            name = _param_text(raw)
            if name not in names:
                names.append(name)
    return ctype, params, cte, disposition, tuple(names)


class _Parser:
    def __init__(self, buf: Buffer, limits: Limits) -> None:
        self.buf = buf
        self.limits = limits
        self.parts: list[Part] = []
        self.problems: list[str] = []
        self.unscannable: list[Unscannable] = []
        self.entities = 0
        self.stopped = False

    def entity(self, headers: HeaderList, start: int, body_start: int, end: int, *, depth: int,
               path: str, default_type: str = "text/plain") -> None:
        if self.stopped:
            return
        self.entities += 1
        if self.entities > self.limits.max_parts:
            self.unscannable.append(Unscannable(
                f"more than {self.limits.max_parts} MIME parts", virus=True, listing=True))
            self.stopped = True
            return
        ctype, params, cte, disposition, names = _part_info(headers, default_type)
        if depth > self.limits.max_depth and (ctype.startswith("multipart/") or ctype == "message/rfc822"):
            self.unscannable.append(Unscannable(
                f"MIME nesting deeper than {self.limits.max_depth}", virus=True, listing=True))
            self.stopped = True
            return
        boundary = params.get("boundary", "")
        if ctype.startswith("multipart/") and boundary:
            digest = ctype == "multipart/digest"
            if self.multipart(boundary, body_start, end, depth=depth, path=path,
                              default_type="message/rfc822" if digest else "text/plain"):
                return
            self.problems.append(f"part {path or 'top'}: multipart without its boundary lines")
        elif ctype.startswith("multipart/"):
            self.problems.append(f"part {path or 'top'}: multipart without a boundary")
        elif ctype in ("message/rfc822", "message/global") and cte in ("", "7bit", "8bit", "binary"):
            inner_headers, inner_body = split_entity(self.buf, body_start, end)
            self.entity(inner_headers, body_start, inner_body, end, depth=depth + 1,
                        path=f"{path}.1" if path else "1")
            return
        self.parts.append(Part(
            index=len(self.parts), path=path or "top", depth=depth, headers=headers,
            content_type=ctype, params=params, transfer_encoding=cte, disposition=disposition,
            filenames=names, start=start, body_start=body_start, end=end, is_top=(path == ""),
        ))

    def multipart(self, boundary: str, start: int, end: int, *, depth: int, path: str,
                  default_type: str) -> bool:
        delim = b"--" + boundary.encode("utf-8", "surrogateescape")
        lines = self.delimiters(delim, start, end)
        if not lines:
            return False
        # The preamble before the first delimiter is ignored, as MUAs do.  Text after a
        # close delimiter that is followed by more delimiter lines is still taken as
        # parts: some MUAs show such parts, so the filters must see them too.
        for n, (_, next_start, close) in enumerate(lines, 1):
            if self.stopped or (close and n == len(lines)):
                break
            part_end = _strip_line_end(self.buf, next_start, lines[n][0] if n < len(lines) else end)
            if next_start >= part_end and n == len(lines):
                break  # nothing after the last delimiter (a truncated message)
            headers, body_start = split_entity(self.buf, next_start, part_end)
            self.entity(headers, next_start, body_start, part_end, depth=depth + 1,
                        path=f"{path}.{n}" if path else str(n), default_type=default_type)
        if not lines[-1][2]:
            self.problems.append(f"part {path or 'top'}: no closing boundary (truncated?)")
        return True

    def delimiters(self, delim: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Delimiter lines in [start, end): (line start, start of next line, is the close)."""
        buf = self.buf
        found: list[tuple[int, int, bool]] = []
        at = start if buf[start:start + len(delim)] == delim else self._next(delim, start, end)
        while at >= 0:
            after = at + len(delim)
            eol = buf.find(b"\n", after, end)
            line_end = end if eol < 0 else eol
            tail = bytes(buf[after:min(line_end, after + 200)])
            close = tail.startswith(b"--")
            # "--boundaryX" is another boundary's line, not ours: only blanks may follow.
            if close or not tail.strip():
                found.append((at, line_end if eol < 0 else eol + 1, close))
            at = self._next(delim, after, end)
        return found

    def _next(self, delim: bytes, pos: int, end: int) -> int:
        hit = self.buf.find(b"\n" + delim, pos, end)
        return -1 if hit < 0 else hit + 1


def _strip_line_end(buf: Buffer, start: int, end: int) -> int:
    """Drop the line break before a delimiter line (it belongs to the delimiter)."""
    if end > start and buf[end - 1:end] == b"\n":
        end -= 1
        if end > start and buf[end - 1:end] == b"\r":
            end -= 1
    return end


def split_entity(buf: Buffer, start: int, end: int) -> tuple[HeaderList, int]:
    """Split an entity at its blank line: (headers, body start)."""
    if buf[start:start + 2] == b"\r\n":
        return [], start + 2
    if buf[start:start + 1] == b"\n":
        return [], start + 1
    limit = min(end, start + MAX_PART_HEADER)
    crlf = buf.find(b"\n\r\n", start, limit)
    lf = buf.find(b"\n\n", start, limit)
    cut = min((p for p in (crlf, lf) if p >= 0), default=-1)
    if cut < 0:
        return parse_header_block(bytes(buf[start:limit])), end
    body_start = cut + (3 if cut == crlf else 2)
    return parse_header_block(bytes(buf[start:cut])), body_start


# ---------------------------------------------------------------- decoding


def iter_decoded(buf: Buffer, part: Part, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The part's body with its transfer encoding undone, in chunks."""
    start, end = part.body_start, part.end
    if part.transfer_encoding == "base64":
        carry = b""
        for off in range(start, end, chunk):
            data = carry + _B64_JUNK.sub(b"", bytes(buf[off:min(off + chunk, end)]))
            usable = len(data) - len(data) % 4
            if usable:
                yield _b64(data[:usable])
            carry = data[usable:]
        if carry.strip(b"="):
            yield _b64(carry + b"=" * (-len(carry) % 4))
    elif part.transfer_encoding == "quoted-printable":
        carry = b""
        for off in range(start, end, chunk):
            data = carry + bytes(buf[off:min(off + chunk, end)])
            cut = data.rfind(b"\n") + 1 if off + chunk < end else len(data)
            yield binascii.a2b_qp(data[:cut])
            carry = data[cut:]
        if carry:
            yield binascii.a2b_qp(carry)
    else:
        for off in range(start, end, chunk):
            yield bytes(buf[off:min(off + chunk, end)])


def _b64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        # Padding in the middle (concatenated encodings): decode group by group.
        out = bytearray()
        for i in range(0, len(data), 4):
            try:
                out += binascii.a2b_base64(data[i:i + 4])
            except binascii.Error:
                continue
        return bytes(out)


def decoded_head(buf: Buffer, part: Part, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` decoded bytes of a part (for content sniffing)."""
    encoded = size * 2 if part.transfer_encoding == "base64" else size * 3
    probe = Part(**{**part.__dict__, "end": min(part.end, part.body_start + encoded)})
    return b"".join(iter_decoded(buf, probe))[:size]


def decoded_bytes(buf: Buffer, part: Part, limit: int) -> bytes:
    """At most ``limit`` decoded bytes of a part."""
    out = bytearray()
    for chunk in iter_decoded(buf, part, chunk=min(limit + 4, 1 << 20)):
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])


# ---------------------------------------------------------------- the message


@dataclass
class Texts:
    """Decoded text of a message, for keyword rules (already bounded)."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""

    def header(self, name: str) -> str:
        """Every header called ``name`` joined by newlines."""
        wanted = name.lower()
        return "\n".join(v for k, v in self.headers if k.lower() == wanted)

    @property
    def all_headers(self) -> str:
        """All header fields as ``Name: value`` lines."""
        return "\n".join(f"{k}: {v}" for k, v in self.headers)


class Message:
    """One message: the header fields as received, the spooled body, and lazy analyses."""

    # Lazy values are plain attributes, not functools.cached_property: on Python 3.11
    # that takes a lock shared by every instance.
    def __init__(self, headers: HeaderList, body: BodySpool, limits: Limits | None = None) -> None:
        self.headers = headers
        self.spool = body
        self.limits = limits or Limits()
        self._header_block: bytes | None = None
        self._parser: _Parser | None = None
        self._digest: str | None = None
        self._inventory: Inventory | None = None
        self._first: dict[str, bytes] | None = None

    @property
    def body(self) -> Buffer:
        """The body buffer (bytes or memory map)."""
        return self.spool.buffer()

    def header(self, name: str) -> bytes | None:
        """The raw value of the first header field called ``name`` (case-insensitive)."""
        if self._first is None:
            first: dict[str, bytes] = {}
            for key, value in self.headers:
                first.setdefault(key.lower(), value)
            self._first = first
        return self._first.get(name.lower())

    @property
    def header_block(self) -> bytes:
        """The header section as it would be written to a file (CRLF, folding kept)."""
        if self._header_block is None:
            self._header_block = render_headers(self.headers)
        return self._header_block

    @property
    def size(self) -> int:
        """Bytes of header section, blank line and body."""
        return len(self.header_block) + 2 + self.spool.size

    @property
    def _parsed(self) -> _Parser:
        if self._parser is None:
            parser = _Parser(self.body, self.limits)
            parser.entity(self.headers, 0, 0, len(self.body), depth=0, path="")
            self._parser = parser
        return self._parser

    @property
    def parts(self) -> list[Part]:
        """The leaf parts in order."""
        return self._parsed.parts

    @property
    def problems(self) -> list[str]:
        """Notes about broken structure (the message still parsed)."""
        return self._parsed.problems

    @property
    def unscannable(self) -> list[Unscannable]:
        """Limits that stopped the parse or the archive listing."""
        return self._parsed.unscannable + self.inventory.unscannable

    @property
    def body_digest(self) -> str:
        """SHA-256 of the body plus the header fields that decide how it is decoded."""
        if self._digest is None:
            h = hashlib.sha256()
            for name in ("Content-Type", "Content-Transfer-Encoding", "MIME-Version"):
                h.update(name.encode() + b":" + (self.header(name) or b"") + b"\n")
            h.update(self.body)
            self._digest = h.hexdigest()
        return self._digest

    @property
    def inventory(self) -> Inventory:
        """Attachment names, types and archive members (listed on first use)."""
        if self._inventory is None:
            from milters.archives import take_inventory

            self._inventory = take_inventory(self)
        return self._inventory

    def stream(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The whole message (header section, blank line, body) in chunks."""
        yield self.header_block + b"\r\n"
        body = self.body
        for off in range(0, len(body), chunk):
            yield bytes(body[off:off + chunk])

    def raw(self) -> bytes:
        """The whole message in memory (only for small messages and tests)."""
        return b"".join(self.stream())

    def texts(self, limit: int) -> Texts:
        """Decoded header fields and text parts, at most ``limit`` characters of body text."""
        out = Texts(headers=[(name, decode_header_value(value)) for name, value in self.headers])
        pieces: list[str] = []
        left = limit
        for part in self.parts:
            if left <= 0:
                break
            if not part.is_text:
                continue
            data = decoded_bytes(self.body, part, left * 4)
            text = decode_bytes(data, part.charset)
            if part.content_type == "text/html":
                text = html_to_text(text)
            pieces.append(text[:left])
            left -= len(pieces[-1])
        out.body = "\n".join(pieces)
        return out

    def close(self) -> None:
        """Release the spooled body."""
        self.spool.close()


@dataclass(frozen=True)
class Attachment:
    """A file name found in the message, with where it was found."""

    name: str
    part: int
    """Index of the leaf part that carries it (the part a strip removes)."""
    where: str
    """``attachment``, ``content type``, ``content`` or the archive path."""
    extensions: frozenset[str]


@dataclass
class Inventory:
    """Everything the extension filter and the virus filter need to know about files."""

    attachments: list[Attachment] = field(default_factory=list)
    unscannable: list[Unscannable] = field(default_factory=list)
    archives: int = 0
    members: int = 0


def extensions_of(name: str) -> frozenset[str]:
    """The extension a file manager would act on: after the last dot, trailing junk dropped.

    ``invoice.pdf.exe`` -> {exe}; ``a.exe.`` and ``a.exe   `` -> {exe} (Windows drops
    trailing dots and blanks); ``a.exe\\0.txt`` -> {exe, txt} (C string truncation).
    """
    out: set[str] = set()
    candidates = {name}
    if "\x00" in name:
        candidates.add(name.split("\x00", 1)[0])
    for candidate in candidates:
        base = re.split(r"[\\/]", candidate)[-1]
        base = _EXT_JUNK.sub("", base)
        if "." in base:
            ext = base.rsplit(".", 1)[1].strip().lower()
            if ext:
                out.add(ext)
    return frozenset(out)


def render_headers(headers: HeaderList) -> bytes:
    """Header fields as wire bytes, folding lines normalised to CRLF."""
    out = bytearray()
    for name, value in headers:
        out += name.encode("ascii", "replace") + b": " + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out += b"\r\n"
    return bytes(out)


def guess_name(raw: bytes) -> str:
    """A file name stored as bytes (archives): UTF-8 or a Japanese charset."""
    return guess_decode(raw)


def spooled_file(limits: Limits) -> tempfile.SpooledTemporaryFile[bytes]:
    """A scratch file in memory up to ``memory_limit``, then in ``spool_dir``."""
    return tempfile.SpooledTemporaryFile(max_size=limits.memory_limit, dir=limits.spool_dir)


def ensure_dir(path: str) -> None:
    """Create a private directory (mode 0700) if needed."""
    Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
