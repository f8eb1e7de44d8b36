"""The quarantine as the web console sees it: a small interface the milter implements.

The quarantine's store and its release path belong to the milter (``milters/quarantine.py``);
the core names no daemon, so the milter registers a factory in the ``mailwarden.quarantine``
entry-point group (``milter = "milters.webquarantine:open_quarantine"``), called with the
configuration.  The directory does not hold quarantined mail, so who may see an entry is
decided here: a person sees a message held for any recipient of theirs, listed with their
recipients only, and releases or deletes it for those; the others' copy stays held
(:func:`visible`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Protocol

from mailwarden.config import Config

QUARANTINE_GROUP = "mailwarden.quarantine"


class QuarantineError(Exception):
    """A release or delete that failed for a reason a retry may cure (the message stays held)."""


class NotHeld(LookupError):
    """No quarantined message with that id."""


@dataclass(frozen=True)
class Held:
    """One quarantined message, as listed."""

    id: str
    created: float
    sender: str
    recipients: tuple[str, ...]
    reason: str
    subject: str
    size: int


class Quarantine(Protocol):
    """List, release and delete quarantined mail."""

    def held(self) -> list[Held]:
        """Every quarantined message, oldest first."""
        ...

    def get(self, entry_id: str) -> Held:
        """One message, or NotHeld."""
        ...

    def release(self, entry_id: str, recipients: Sequence[str] | None = None) -> str:
        """Deliver the message to its recipients (or to those of them named, the others'
        copy staying held), then drop it; the queue id.  QuarantineError when it could not
        be delivered now (it stays held)."""
        ...

    def delete(self, entry_id: str, recipients: Sequence[str] | None = None) -> None:
        """Drop the message (for those of its recipients named); NotHeld when it is not there."""
        ...


def visible(entries: Sequence[Held], owns: Callable[[str], bool]) -> list[Held]:
    """The entries held for a recipient ``owns`` accepts, each listing those recipients only
    (another recipient's address, a Bcc among them, is not shown)."""
    out = []
    for entry in entries:
        mine = tuple(r for r in entry.recipients if owns(r))
        if mine:
            out.append(replace(entry, recipients=mine))
    return out


def open_quarantine(config: Config) -> Quarantine | None:
    """The registered quarantine (None when no daemon registers one)."""
    for ep in sorted(entry_points(group=QUARANTINE_GROUP), key=lambda e: e.name):
        factory = ep.load()
        found: Quarantine | None = factory(config)
        if found is not None:
            return found
    return None
