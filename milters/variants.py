"""Content variants: what each group of recipients receives, as milter changes or bytes.

The same edits (:mod:`milters.verdict`) are rendered two ways: as header changes
and a replacement body that the milter applies to the message in the queue (for
the largest group of recipients), and as complete message bytes that are
re-injected for every other group.  Removals use the indexes of the header
fields as received, so they are applied first, then the Subject change, then
additions at the end of the header section.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import Header

from milters.message import HeaderList, Message, Part, render_headers
from milters.text import guess_decode
from milters.verdict import AddHeader, Edit, RemoveHeader, StripParts, TagSubject

StripText = Callable[[StripParts, Part], str]
"""Renders the note that replaces a stripped part."""


@dataclass(frozen=True)
class HeaderChange:
    """``add`` a field at the end, or ``change`` the index-th field of a name (empty deletes)."""

    op: str
    name: str
    value: str
    index: int = 0


@dataclass
class Rendition:
    """One variant: header changes and, when parts are stripped, a new body."""

    changes: list[HeaderChange]
    body: Callable[[], Iterator[bytes]] | None = None


def _count(headers: HeaderList, name: str) -> int:
    wanted = name.lower()
    return sum(1 for key, _ in headers if key.lower() == wanted)


def header_text(raw: bytes) -> str:
    """A header value we rewrite: kept as is when UTF-8, else re-encoded as an RFC 2047 word."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return Header(guess_decode(raw), "utf-8").encode()


def render(message: Message, edits: tuple[Edit, ...], strip_text: StripText) -> Rendition:
    """Turn a variant's edits into header changes and an optional new body."""
    removals: list[HeaderChange] = []
    subject: list[HeaderChange] = []
    additions: list[HeaderChange] = []
    body: Callable[[], Iterator[bytes]] | None = None
    for edit in edits:
        if isinstance(edit, RemoveHeader):
            indexes = edit.indexes or range(1, _count(message.headers, edit.name) + 1)
            for index in sorted(indexes, reverse=True):
                removals.append(HeaderChange("change", edit.name, "", index))
        elif isinstance(edit, TagSubject):
            tag = edit.tag if edit.tag.isascii() else Header(edit.tag, "utf-8").encode()
            raw = next((v for k, v in message.headers if k.lower() == "subject"), None)
            if raw is None:
                additions.append(HeaderChange("add", "Subject", tag))
            else:
                subject.append(HeaderChange("change", "Subject", f"{tag} {header_text(raw)}", 1))
        elif isinstance(edit, AddHeader):
            additions.append(HeaderChange("add", edit.name, edit.value))
        else:
            parts = [message.parts[i] for i in edit.parts]
            body = _stripped_body(message, parts, edit, strip_text)
            if any(p.is_top for p in parts):
                removals.extend(_top_part_changes(message.headers))
    return Rendition(removals + subject + additions, body)


def _top_part_changes(headers: HeaderList) -> list[HeaderChange]:
    """The message itself was the banned file: it becomes a text/plain note."""
    changes = [HeaderChange("change", "Content-Disposition", "", i)
               for i in range(_count(headers, "Content-Disposition"), 0, -1)]
    for name, value in (("Content-Type", 'text/plain; charset="utf-8"'),
                        ("Content-Transfer-Encoding", "base64")):
        if _count(headers, name):
            changes.append(HeaderChange("change", name, value, 1))
        else:
            changes.append(HeaderChange("add", name, value))
    return changes


def _note_part(text: str, *, with_headers: bool) -> bytes:
    encoded = base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n")
    if not with_headers:
        return encoded
    return (b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n'
            b"Content-Disposition: inline\r\n\r\n" + encoded.rstrip(b"\r\n"))


def _stripped_body(message: Message, parts: list[Part], edit: StripParts,
                   strip_text: StripText) -> Callable[[], Iterator[bytes]]:
    ordered = sorted(parts, key=lambda p: p.start)

    def stream() -> Iterator[bytes]:
        buf = message.body
        pos = 0
        for part in ordered:
            if part.is_top:
                yield _note_part(strip_text(edit, part), with_headers=False)
                return
            yield bytes(buf[pos:part.start])
            yield _note_part(strip_text(edit, part), with_headers=True)
            pos = part.end
        for off in range(pos, len(buf), 1 << 20):
            yield bytes(buf[off:min(off + (1 << 20), len(buf))])

    return stream


def apply_changes(headers: HeaderList, changes: list[HeaderChange]) -> HeaderList:
    """The header list after ``changes`` (what the MTA does with the same changes)."""
    out = list(headers)
    for change in changes:
        if change.op == "add":
            out.append((change.name, change.value.encode("utf-8")))
            continue
        seen = 0
        for i, (name, _) in enumerate(out):
            if name.lower() == change.name.lower():
                seen += 1
                if seen == change.index:
                    if change.value:
                        out[i] = (name, change.value.encode("utf-8"))
                    else:
                        del out[i]
                    break
    return out


def variant_stream(message: Message, rendition: Rendition, trace: bytes = b"") -> Iterator[bytes]:
    """The complete message of a variant, for re-injection (``trace``: a Received field first)."""
    yield trace + render_headers(apply_changes(message.headers, rendition.changes)) + b"\r\n"
    if rendition.body is not None:
        yield from rendition.body()
        return
    body = message.body
    for off in range(0, len(body), 1 << 20):
        yield bytes(body[off:min(off + (1 << 20), len(body))])
