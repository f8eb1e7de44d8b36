"""Quarantined mail: the message on disk, its index entry in the shared store.

Each entry is one file ``ID.eml`` (mode 0600, written to a temporary name and
renamed, so a crash never leaves half a message under a real name) and one store
key ``quarantine:ID`` holding the envelope and the reason as JSON, with the
retention time as its TTL.  In a cluster the directory should be shared (NAS)
or releases run on the node named in the entry.  ``expire()`` removes files
whose entry has expired (``mailwarden quarantine expire``, daily from the shipped
systemd timer ``mailwarden-quarantine-expire.timer`` or cron).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mailwarden.store import Store
from milters.message import render_headers, reserved_header_names, split_entity
from milters.reinject import Injector

PREFIX = "quarantine:"
ID_PATTERN = re.compile(r"^[0-9]{14}-[0-9a-f]{10}$")


class NotQuarantined(LookupError):
    """No quarantine entry with that id."""


@dataclass
class QuarantineEntry:
    """One quarantined message."""

    id: str
    created: float
    sender: str
    recipients: list[str]
    reason: str
    queue_id: str = ""
    size: int = 0
    subject: str = ""
    from_header: str = ""
    node: str = ""
    recipient_params: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        """The store value."""
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QuarantineEntry:
        """Parse a store value."""
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Quarantine:
    """Put, list, show, release, delete and expire quarantined mail."""

    def __init__(self, store: Store, directory: str | os.PathLike[str], *, retention_days: int = 30,
                 node: str = "") -> None:
        self.store = store
        self.dir = Path(directory)
        self.retention = retention_days * 86400
        self.node = node

    def path(self, entry_id: str) -> Path:
        """The file of an entry (the id is checked, so no path tricks)."""
        if not ID_PATTERN.match(entry_id):
            raise NotQuarantined(f"{entry_id!r} is not a quarantine id")
        return self.dir / f"{entry_id}.eml"

    def put(self, stream: Iterable[bytes], *, sender: str, recipients: Sequence[str], reason: str,
            queue_id: str = "", subject: str = "", from_header: str = "",
            recipient_params: dict[str, list[str]] | None = None) -> QuarantineEntry:
        """Store a message; raises OSError or StoreUnavailable (the caller tempfails)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry_id = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(5)
        final = self.path(entry_id)
        tmp = final.with_suffix(".tmp")
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in stream:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry = QuarantineEntry(
            id=entry_id, created=time.time(), sender=sender, recipients=list(recipients), reason=reason,
            queue_id=queue_id, size=size, subject=subject, from_header=from_header, node=self.node,
            recipient_params=recipient_params or {},
        )
        try:
            self.store.set(PREFIX + entry_id, entry.to_json(), ttl=float(self.retention))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return entry

    def get(self, entry_id: str) -> QuarantineEntry:
        """The entry, or NotQuarantined."""
        self.path(entry_id)
        value = self.store.get(PREFIX + entry_id)
        if value is None:
            raise NotQuarantined(f"no quarantine entry {entry_id}")
        return QuarantineEntry.from_json(value)

    def entries(self) -> list[QuarantineEntry]:
        """All live entries, oldest first."""
        out = []
        for key in self.store.scan(PREFIX):
            value = self.store.get(key)
            if value is not None:
                out.append(QuarantineEntry.from_json(value))
        return sorted(out, key=lambda e: e.created)

    def read(self, entry_id: str) -> bytes:
        """The quarantined message."""
        self.get(entry_id)
        try:
            return self.path(entry_id).read_bytes()
        except FileNotFoundError:
            raise NotQuarantined(f"quarantine entry {entry_id} has no file here ({self.dir})") from None

    def delete(self, entry_id: str) -> bool:
        """Remove entry and file; True if anything was there."""
        path = self.path(entry_id)
        removed = self.store.delete(PREFIX + entry_id) > 0
        if path.exists():
            path.unlink()
            removed = True
        return removed

    def release(self, entry_id: str, injector: Injector, *, recipients: Sequence[str] = (),
                deadline: float) -> str:
        """Deliver a quarantined message (to its recipients or ``recipients``), then delete it."""
        entry = self.get(entry_id)
        data = without_reserved_headers(self.read(entry_id))
        targets = list(recipients) or entry.recipients
        queue_id = injector.send(
            entry.sender, [(r, tuple(entry.recipient_params.get(r, ()))) for r in targets], [data],
            deadline=deadline,
        )
        self.delete(entry_id)
        return queue_id

    def expire(self, now: float | None = None) -> int:
        """Delete files whose entry expired (or that are older than the retention)."""
        if not self.dir.is_dir():
            return 0
        now = time.time() if now is None else now
        removed = 0
        for path in self.dir.iterdir():
            if path.suffix == ".tmp" and path.stat().st_mtime < now - 3600:
                path.unlink(missing_ok=True)
                continue
            if path.suffix != ".eml" or not ID_PATTERN.match(path.stem):
                continue
            too_old = path.stat().st_mtime < now - self.retention
            if too_old or self.store.get(PREFIX + path.stem) is None:
                self.store.delete(PREFIX + path.stem)
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def without_reserved_headers(data: bytes) -> bytes:
    """The message without the fields only mailwarden may set (``X-Spam-*``,
    ``X-Mailwarden-*``, the junk mark among them).

    The quarantine keeps the message as received, and a released copy does not pass
    the milter again, which removes such fields set outside mailwarden for everyone;
    the mailbox's Sieve script files mail with the junk mark into Junk.
    """
    headers, body_start = split_entity(data, 0, len(data))
    reserved = {name.lower() for name in reserved_header_names(headers)}
    kept = [(name, value) for name, value in headers if name.lower() not in reserved]
    if len(kept) == len(headers):
        return data
    return render_headers(kept) + b"\r\n" + data[body_start:]
