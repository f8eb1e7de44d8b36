"""The file inventory of a message: attachment names, what their content really is,
and the members of zip, tar and gzip/bzip2/xz archives (nested), within limits.

Names come from the MIME headers (RFC 2231 and encoded-word forms already
decoded by :mod:`milters.message`), from the declared content type (an
``application/x-msdownload`` part is an ``.exe`` whatever it is called) and from
the first bytes of the content (a PE executable is an ``.exe`` even if named
``invoice.pdf``).  Archives are listed without extracting anything but nested
archives, and every byte unpacked counts against per-message limits on depth,
member count, total size and compression ratio; beyond them the listing is
incomplete and the extension filter treats the message as unscannable (an archive
bomb), never silently passed.  These limits are the lister's own: they do not make
the message unscannable for the virus scan, which sends the whole message to clamd,
where clamd's own limits decide (``Heuristics.Limits.Exceeded`` when it gives up).
What clamd cannot read either - an encrypted member - stays unscannable for the scan.
"""

from __future__ import annotations

import bz2
import functools
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol

from milters.message import (
    Attachment,
    BodySpool,
    Inventory,
    Limits,
    Message,
    Part,
    Unscannable,
    decoded_bytes,
    decoded_head,
    extensions_of,
    guess_name,
    iter_decoded,
    split_entity,
    spooled_file,
)

ARCHIVE_EXTENSIONS = frozenset({"zip", "tar", "tgz", "gz", "tbz", "tbz2", "bz2", "txz", "xz"})
BOMB_FLOOR = 1024 * 1024
"""Members smaller than this may have any compression ratio (a page of zeros is fine)."""
_CHUNK = 64 * 1024

# Declared types that mean an executable whatever the file is called.
TYPE_EXTENSIONS = {
    "application/x-msdownload": "exe",
    "application/x-msdos-program": "exe",
    "application/x-dosexec": "exe",
    "application/x-ms-dos-executable": "exe",
    "application/vnd.microsoft.portable-executable": "exe",
    "application/x-msi": "msi",
    "application/x-ms-installer": "msi",
    "application/hta": "hta",
    "application/javascript": "js",
    "application/x-javascript": "js",
    "text/javascript": "js",
    "application/x-bat": "bat",
    "application/bat": "bat",
    "application/java-archive": "jar",
    "application/x-java-archive": "jar",
    "application/x-ms-shortcut": "lnk",
    "text/vbscript": "vbs",
    "application/x-vbscript": "vbs",
}


class _TooMuch(Exception):
    """A limit was crossed; the message is unscannable."""


class _Broken(Exception):
    """An archive that cannot be listed."""


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass
class _Budget:
    limits: Limits
    members: int = 0
    unpacked: int = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.archive_max_members:
            raise _TooMuch(f"more than {self.limits.archive_max_members} archive members")

    def unpack(self, size: int, where: str) -> None:
        self.unpacked += size
        if self.unpacked > self.limits.archive_max_size:
            raise _TooMuch(
                f"archive bomb: more than {self.limits.archive_max_size} bytes unpacked ({where})"
            )

    def ratio(self, packed: int, unpacked: int, where: str) -> None:
        if unpacked > BOMB_FLOOR and unpacked > packed * self.limits.archive_max_ratio:
            raise _TooMuch(
                f"archive bomb: {where} expands {unpacked // max(packed, 1)}:1"
            )


def kind_of(head: bytes) -> str | None:
    """Archive or executable kind from the first bytes of a file."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and len(head) > 3 and head[3:4].isdigit():
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    if is_pe(head):
        return "exe"
    return None


def is_pe(head: bytes) -> bool:
    """A DOS/Windows executable: ``MZ`` and a PE header or the DOS stub's text."""
    if not head.startswith(b"MZ") or len(head) < 64:
        return False
    (offset,) = struct.unpack_from("<I", head, 60)
    if offset + 4 <= len(head) and head[offset:offset + 4] == b"PE\x00\x00":
        return True
    return b"This program cannot be run in DOS mode" in head or b"This program must be run under" in head


MESSAGE_TYPES = ("message/rfc822", "message/global")


def take_inventory(message: Message, *, depth: int = 0, budget: _Budget | None = None) -> Inventory:
    """List every file name and archive member in the message, within its limits."""
    inv = Inventory()
    budget = budget or _Budget(message.limits)
    for part in message.parts:
        try:
            _part_inventory(message, part, inv, budget, depth)
        except _TooMuch as exc:
            # The lister's own limit: clamd, not this lister, decides what the scan can see.
            inv.unscannable.append(Unscannable(str(exc), virus=False, listing=True))
            break
    return inv


def _part_inventory(message: Message, part: Part, inv: Inventory, budget: _Budget, depth: int) -> None:
    label = part.filenames[0] if part.filenames else f"part {part.path}"
    for name in part.filenames:
        inv.attachments.append(Attachment(name, part.index, "attachment", extensions_of(name)))
    declared = TYPE_EXTENSIONS.get(part.content_type)
    if declared:
        inv.attachments.append(Attachment(label, part.index, "content type", frozenset({declared})))
    if part.is_text and not part.filenames:
        return
    if part.content_type in MESSAGE_TYPES or any("eml" in extensions_of(n) for n in part.filenames):
        _forwarded_inventory(message, part, inv, budget, label=label, depth=depth)
        return
    head = decoded_head(message.body, part, 1024)
    kind = kind_of(head)
    if kind == "exe":
        inv.attachments.append(Attachment(label, part.index, "content", frozenset({"exe"})))
        return
    named_archive = any(ext in ARCHIVE_EXTENSIONS for name in part.filenames for ext in extensions_of(name))
    if kind is None and not named_archive:
        return
    with spooled_file(message.limits) as data:
        for chunk in iter_decoded(message.body, part):
            data.write(chunk)
        size = data.tell()
        data.seek(0)
        _Lister(message.limits, budget, inv, part.index).archive(data, label, size, depth=1)


def _forwarded_inventory(message: Message, part: Part, inv: Inventory, budget: _Budget, *, label: str,
                         depth: int) -> None:
    """An encoded forwarded message (base64 message/rfc822, an attached .eml): parse it too."""
    if depth >= message.limits.archive_max_depth:
        raise _TooMuch(f"forwarded messages nested deeper than {message.limits.archive_max_depth}")
    left = message.limits.archive_max_size - budget.unpacked
    data = decoded_bytes(message.body, part, left + 1)
    budget.unpack(len(data), label)
    headers, body_start = split_entity(data, 0, len(data))
    spool = BodySpool(message.limits.memory_limit, message.limits.spool_dir)
    spool.write(data[body_start:])
    inner = Message(headers, spool, message.limits)
    try:
        found = take_inventory(inner, depth=depth + 1, budget=budget)
        for a in found.attachments:
            where = f"in forwarded message {label}" if a.where == "attachment" else \
                f"{a.where} in forwarded message {label}"
            inv.attachments.append(Attachment(a.name, part.index, where, a.extensions))
        # A limit that stopped the listing of the forwarded message (its parse, its
        # archives) is the lister's own: clamd parses that message itself.  What was
        # listed but cannot be read (an encrypted member) stays unscannable for the scan.
        inv.unscannable.extend(Unscannable(u.reason, virus=u.virus and not u.listing, listing=u.listing)
                               for u in inner.unscannable)
        inv.archives += found.archives
        inv.members += found.members
    finally:
        inner.close()


class _Lister:
    def __init__(self, limits: Limits, budget: _Budget, inv: Inventory, part: int) -> None:
        self.limits = limits
        self.budget = budget
        self.inv = inv
        self.part = part

    def archive(self, data: IO[bytes], where: str, size: int, *, depth: int) -> None:
        """List the archive in ``data`` (any kind we know); record members and problems."""
        head = data.read(1024)
        data.seek(0)
        kind = kind_of(head)
        if kind is None or kind == "exe":
            return
        if depth > self.limits.archive_max_depth:
            raise _TooMuch(f"archives nested deeper than {self.limits.archive_max_depth} ({where})")
        self.inv.archives += 1
        try:
            if kind == "zip":
                self.zip(data, where, depth)
            elif kind == "tar":
                self.tar(data, where, depth)
            else:
                self.compressed(kind, data, where, size, depth)
        except _Broken as exc:
            self.inv.unscannable.append(Unscannable(f"broken archive {where}: {exc}", virus=False,
                                                    listing=True))

    def add(self, name: str, where: str) -> None:
        self.budget.member()
        self.inv.members += 1
        self.inv.attachments.append(Attachment(name, self.part, where, extensions_of(name)))

    def nested(self, name: str, where: str, depth: int, opener: Callable[[], _Readable]) -> None:
        """Look into a member that is an archive itself (by name)."""
        if not (extensions_of(name) & ARCHIVE_EXTENSIONS):
            return
        inner = f"{where} > {name}"
        with spooled_file(self.limits) as data:
            try:
                size = self.copy(opener(), data, inner)
            except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error,
                    lzma.LZMAError, NotImplementedError, RuntimeError, ValueError) as exc:
                self.inv.unscannable.append(Unscannable(
                    f"broken archive {inner}: {exc}", virus=False, listing=True))
                return
            data.seek(0)
            self.archive(data, inner, size, depth=depth + 1)

    def copy(self, source: _Readable, target: IO[bytes], where: str) -> int:
        total = 0
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return total
            total += len(chunk)
            self.budget.unpack(len(chunk), where)
            target.write(chunk)

    def zip(self, data: IO[bytes], where: str, depth: int) -> None:
        try:
            archive = zipfile.ZipFile(data)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _Broken(str(exc)) from None
        with archive:
            for info in archive.infolist():
                name = info.filename
                if not info.flag_bits & 0x800:  # not flagged UTF-8: the bytes were cp437-decoded
                    name = guess_name(name.encode("cp437", "replace"))
                self.add(name, f"in {where}")
                if info.is_dir():
                    continue
                self.budget.ratio(info.compress_size, info.file_size, f"{where} > {name}")
                if info.flag_bits & 0x1:
                    self.inv.unscannable.append(Unscannable(
                        f"encrypted archive {where} ({name})", virus=True, listing=False))
                    continue
                self.nested(name, where, depth, functools.partial(archive.open, info))

    def tar(self, data: IO[bytes], where: str, depth: int) -> None:
        try:
            archive = tarfile.open(fileobj=data, mode="r:")  # noqa: SIM115 (closed by the with below)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _Broken(str(exc)) from None
        with archive:
            try:
                for member in archive:
                    name = guess_name(member.name.encode("utf-8", "surrogateescape"))
                    self.add(name, f"in {where}")
                    if member.isfile():
                        self.nested(name, where, depth, _tar_opener(archive, member))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise _Broken(str(exc)) from None

    def compressed(self, kind: str, data: IO[bytes], where: str, size: int, depth: int) -> None:
        """A gzip/bzip2/xz stream: unpack (bounded), then list it as tar or as one file."""
        head = data.read(1024)
        data.seek(0)
        with spooled_file(self.limits) as out:
            unpacked = self.decompress(kind, data, out, where)
            self.budget.ratio(size, unpacked, where)
            out.seek(0)
            if tarfile.is_tarfile(out):
                out.seek(0)
                self.tar(out, where, depth)
                return
            name = _gzip_name(head) if kind == "gzip" else None
            name = name or _strip_compression_suffix(where)
            self.add(name, f"in {where}")
            out.seek(0)
            if extensions_of(name) & ARCHIVE_EXTENSIONS:
                self.archive(out, f"{where} > {name}", unpacked, depth=depth + 1)

    def decompress(self, kind: str, source: IO[bytes], target: IO[bytes], where: str) -> int:
        total = 0
        packed = 0
        try:
            if kind == "gzip":
                inflater = zlib.decompressobj(wbits=47)
                while chunk := source.read(_CHUNK):
                    packed += len(chunk)
                    data = chunk
                    while data and not inflater.eof:
                        out = inflater.decompress(data, _CHUNK)
                        total += self._emit(out, target, where, packed, total)
                        data = inflater.unconsumed_tail
                    if inflater.eof:
                        break
                return total
            decomp: bz2.BZ2Decompressor | lzma.LZMADecompressor = (
                bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()
            )
            while not decomp.eof:
                chunk = source.read(_CHUNK) if decomp.needs_input else b""
                if decomp.needs_input and not chunk:
                    break
                packed += len(chunk)
                out = decomp.decompress(chunk, max_length=_CHUNK)
                total += self._emit(out, target, where, packed, total)
            return total
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise _Broken(str(exc)) from None

    def _emit(self, out: bytes, target: IO[bytes], where: str, packed: int, total: int) -> int:
        self.budget.unpack(len(out), where)
        self.budget.ratio(packed, total + len(out), where)
        target.write(out)
        return len(out)


def _tar_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], _Readable]:
    def opener() -> _Readable:
        handle = archive.extractfile(member)
        if handle is None:
            raise _Broken(f"{member.name}: not a regular file")
        return handle

    return opener


def _gzip_name(head: bytes) -> str | None:
    """The original file name stored in a gzip header (FNAME), if any."""
    if len(head) < 10 or not head[3] & 0x08:
        return None
    pos = 10
    if head[3] & 0x04:  # FEXTRA
        if len(head) < 12:
            return None
        (xlen,) = struct.unpack_from("<H", head, 10)
        pos = 12 + xlen
    end = head.find(b"\x00", pos)
    if end < 0:
        return None
    return guess_name(head[pos:end]) or None


def _strip_compression_suffix(where: str) -> str:
    base = where.rsplit(" > ", 1)[-1]
    lowered = base.lower()
    for suffix, replacement in ((".tgz", ".tar"), (".tbz2", ".tar"), (".tbz", ".tar"), (".txz", ".tar"),
                                (".gz", ""), (".bz2", ""), (".xz", "")):
        if lowered.endswith(suffix):
            return base[: -len(suffix)] + replacement
    return base
