"""Quarantined mail: the message on disk, its index entry in the shared store.

Each entry is one file ``DIR/YYYYMMDD/ID.eml`` (by the day it was quarantined, so no
directory holds more than a day's worth; entries written before that layout are read
from ``DIR/ID.eml``) and one store key ``quarantine:ID`` holding the envelope and the
reason as JSON, with the retention time as its TTL.  In a cluster ``DIR`` is on the
shared volume (NAS), so every node lists, shows and releases the same entries.

A message is never lost while its entry exists: ``put`` writes the file under a
temporary name, fsyncs it, renames it and fsyncs the directory before the entry is
written; ``delete`` and ``release`` remove the entry before the file.  A crash between
the two steps leaves a file without an entry, which ``expire()`` removes (``mailwarden
quarantine expire``, daily from the shipped systemd timer
``mailwarden-quarantine-expire.timer`` or cron).  Ids carry the second and 64 random
bits, so nodes writing the same directory do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mailwarden.logfields import ID_HEADER
from mailwarden.store import Store
from milters.message import render_headers, reserved_header_names, split_entity
from milters.reinject import Injector

PREFIX = "quarantine:"
RELEASE_PREFIX = "quarantine-release:"
# 16 random hex digits; entries written before had 10.
ID_PATTERN = re.compile(r"^[0-9]{14}-[0-9a-f]{10}(?:[0-9a-f]{6})?$")
DAY_PATTERN = re.compile(r"^[0-9]{8}$")
# A file younger than this without its entry may be a put between its rename and the
# entry (on another node, whose clock may differ): expire leaves it alone.
GRACE = 3600.0
_LOOKUP_BATCH = 500


class NotQuarantined(LookupError):
    """No quarantine entry with that id."""


class FileMissing(NotQuarantined):
    """The index has the entry, but its file is not in the quarantine directory."""


class ReleaseUnderWay(RuntimeError):
    """Another release of the entry (on this or another node) has not finished."""


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
    mwid: str = ""
    """The message's mailwarden id: the released copy carries it as ``X-Mailwarden-Id``."""

    def to_json(self) -> str:
        """The store value."""
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> QuarantineEntry:
        """Parse a store value."""
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Quarantine:
    """Put, list, show, release, delete and expire quarantined mail."""

    def __init__(self, store: Store, directory: str | os.PathLike[str], *, retention_days: int = 30,
                 node: str = "") -> None:
        self.store = store
        self.dir = Path(directory)
        self.retention = retention_days * 86400
        self.node = node

    def path(self, entry_id: str) -> Path:
        """Where an entry's file is written (the id is checked, so no path tricks)."""
        if not ID_PATTERN.match(entry_id):
            raise NotQuarantined(f"{entry_id!r} is not a quarantine id")
        return self.dir / entry_id[:8] / f"{entry_id}.eml"

    def file(self, entry_id: str) -> Path | None:
        """The entry's file as it is on disk now (day directory, or flat for older entries)."""
        for candidate in (self.path(entry_id), self.dir / f"{entry_id}.eml"):
            if candidate.is_file():
                return candidate
        return None

    def put(self, stream: Iterable[bytes], *, sender: str, recipients: Sequence[str], reason: str,
            queue_id: str = "", subject: str = "", from_header: str = "",
            recipient_params: dict[str, list[str]] | None = None, mwid: str = "") -> QuarantineEntry:
        """Store a message; raises OSError or StoreUnavailable (the caller tempfails)."""
        entry_id = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(8)
        final = self.path(entry_id)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            final.parent.mkdir(mode=0o700)
            _fsync_dir(self.dir)
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
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        entry = QuarantineEntry(
            id=entry_id, created=time.time(), sender=sender, recipients=list(recipients), reason=reason,
            queue_id=queue_id, size=size, subject=subject, from_header=from_header, node=self.node,
            recipient_params=recipient_params or {}, mwid=mwid,
        )
        try:
            self.store.set(PREFIX + entry_id, entry.to_json(), ttl=float(self.retention))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return entry

    def usage(self) -> tuple[int, int]:
        """Messages and bytes in the quarantine directory now (files, not store entries)."""
        count = size = 0
        for pattern in ("*/*.eml", "*.eml"):
            for path in self.dir.glob(pattern):
                with contextlib.suppress(OSError):  # removed meanwhile by expire or release
                    size += path.stat().st_size
                    count += 1
        return count, size

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
        """The quarantined message; FileMissing when the entry has no file here."""
        self.get(entry_id)
        path = self.file(entry_id)
        try:
            if path is not None:
                return path.read_bytes()
        except FileNotFoundError:
            pass
        raise FileMissing(f"quarantine entry {entry_id}: its file is missing from {self.dir} "
                          "(is the shared quarantine volume mounted on this node?)")

    def delete(self, entry_id: str) -> bool:
        """Remove the entry, then its file; True if anything was there."""
        self.path(entry_id)
        removed = self.store.delete(PREFIX + entry_id) > 0
        path = self.file(entry_id)
        if path is not None:
            path.unlink(missing_ok=True)
            removed = True
        return removed

    def release(self, entry_id: str, injector: Injector, *, recipients: Sequence[str] = (),
                deadline: float) -> str:
        """Deliver a quarantined message (to its recipients, or to ``recipients`` instead),
        then delete it.

        One release at a time per entry, cluster-wide (a store key held while it runs).
        """
        with self._claim(entry_id, deadline):
            entry = self.get(entry_id)
            queue_id = self._deliver(entry, injector, list(recipients) or entry.recipients, deadline)
            self.delete(entry_id)
        return queue_id

    def release_for(self, entry_id: str, injector: Injector, recipients: Sequence[str], *,
                    deadline: float) -> str:
        """Deliver the message to those of its recipients named; it stays held for the
        others (and is deleted once it is held for nobody)."""
        with self._claim(entry_id, deadline):
            entry = self.get(entry_id)
            targets = self._of(entry, recipients)
            queue_id = self._deliver(entry, injector, targets, deadline)
            self._hold_for(entry, [r for r in entry.recipients if r not in targets])
        return queue_id

    def delete_for(self, entry_id: str, recipients: Sequence[str]) -> None:
        """Drop the message for those of its recipients named; it stays held for the others."""
        with self._claim(entry_id, time.monotonic()):
            entry = self.get(entry_id)
            targets = self._of(entry, recipients)
            self._hold_for(entry, [r for r in entry.recipients if r not in targets])

    @staticmethod
    def _of(entry: QuarantineEntry, recipients: Sequence[str]) -> list[str]:
        wanted = {r.lower() for r in recipients}
        targets = [r for r in entry.recipients if r.lower() in wanted]
        if not targets:
            raise NotQuarantined(f"{entry.id} is not held for {', '.join(recipients) or 'nobody'}")
        return targets

    def _hold_for(self, entry: QuarantineEntry, remaining: list[str]) -> None:
        """Keep the entry for ``remaining`` only (delete it when none is left)."""
        if not remaining:
            self.delete(entry.id)
            return
        left = entry.created + self.retention - time.time()
        kept = replace(entry, recipients=remaining,
                       recipient_params={r: p for r, p in entry.recipient_params.items() if r in remaining})
        self.store.set(PREFIX + entry.id, kept.to_json(), ttl=max(left, 1.0))

    def _deliver(self, entry: QuarantineEntry, injector: Injector, targets: list[str],
                 deadline: float) -> str:
        data = without_reserved_headers(self.read(entry.id))
        if entry.mwid:  # followed by `mailwarden trace` from the original to its release
            data = f"{ID_HEADER}: {entry.mwid}\r\n".encode("ascii") + data
        return injector.send(
            entry.sender, [(r, tuple(entry.recipient_params.get(r, ()))) for r in targets], [data],
            deadline=deadline,
        )

    @contextlib.contextmanager
    def _claim(self, entry_id: str, deadline: float) -> Iterator[None]:
        """The entry's release key, cluster-wide, while a release or a partial delete runs."""
        self.path(entry_id)
        claim = RELEASE_PREFIX + entry_id
        if not self.store.add(claim, self.node or "-", ttl=max(deadline - time.monotonic(), 0.0) + 60.0):
            holder = self.store.get(claim) or "another node"
            raise ReleaseUnderWay(f"{entry_id} is being released by {holder}")
        try:
            yield
        finally:
            self.store.delete(claim)

    def expire(self, now: float | None = None) -> int:
        """Delete files past the retention (and their entries), files whose entry is gone,
        stale temporary files and empty directories of past days; return how many messages."""
        if not self.dir.is_dir():
            return 0
        now = time.time() if now is None else now
        removed = self._expire_in(self.dir, now)
        oldest_kept = time.strftime("%Y%m%d", time.gmtime(now - 2 * 86400))
        for day in sorted(self.dir.iterdir()):
            if DAY_PATTERN.match(day.name) and day.is_dir():
                try:
                    removed += self._expire_in(day, now)
                except FileNotFoundError:  # another node's expire removed it
                    continue
                if day.name < oldest_kept:
                    with contextlib.suppress(OSError):  # not empty, or gone already
                        day.rmdir()
        return removed

    def _expire_in(self, directory: Path, now: float) -> int:
        removed = 0
        orphans: list[Path] = []
        for path in directory.iterdir():
            try:
                mtime = path.lstat().st_mtime
            except FileNotFoundError:  # released, deleted or expired meanwhile
                continue
            if path.suffix == ".tmp":
                if mtime < now - GRACE:
                    path.unlink(missing_ok=True)
                continue
            if path.suffix != ".eml" or not ID_PATTERN.match(path.stem) or not path.is_file():
                continue
            if mtime < now - self.retention:
                self.store.delete(PREFIX + path.stem)  # the entry first, then the file
                path.unlink(missing_ok=True)
                removed += 1
            elif mtime < now - GRACE:
                orphans.append(path)
        for start in range(0, len(orphans), _LOOKUP_BATCH):
            batch = orphans[start:start + _LOOKUP_BATCH]
            values = self.store.get_many([PREFIX + p.stem for p in batch])
            for path, value in zip(batch, values, strict=True):
                if value is None:
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
