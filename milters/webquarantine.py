"""The milter's quarantine behind the web console's interface (``mailwarden.web.quarantine``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from mailwarden.config import Config
from mailwarden.store import Store, StoreUnavailable, store_of
from mailwarden.web.quarantine import Held, NotHeld, QuarantineError
from milters.config import MilterConfig
from milters.quarantine import (
    FileMissing,
    NotQuarantined,
    Quarantine,
    QuarantineEntry,
    ReleaseUnderWay,
)
from milters.reinject import InjectError, SmtpInjector


def _held(entry: QuarantineEntry) -> Held:
    return Held(entry.id, entry.created, entry.sender, tuple(entry.recipients), entry.reason,
                entry.subject, entry.size)


class MilterQuarantine:
    """Releases go through the milter's re-injection smtpd, like ``mailwarden quarantine release``."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.milter = MilterConfig.of(config)
        self.quarantine = Quarantine(store or store_of(config.store), self.milter.quarantine_dir,
                                     retention_days=self.milter.quarantine_days,
                                     node=config.general.node_name)

    def held(self) -> list[Held]:
        """Every entry, oldest first."""
        try:
            return [_held(e) for e in self.quarantine.entries()]
        except StoreUnavailable as exc:
            raise QuarantineError(f"store unavailable: {exc}") from None

    def get(self, entry_id: str) -> Held:
        """One entry."""
        try:
            return _held(self.quarantine.get(entry_id))
        except NotQuarantined as exc:
            raise NotHeld(str(exc)) from None
        except StoreUnavailable as exc:
            raise QuarantineError(f"store unavailable: {exc}") from None

    def release(self, entry_id: str, recipients: Sequence[str] | None = None) -> str:
        """Deliver through the re-injection smtpd (to ``recipients`` of its own only), then delete."""
        m = self.milter
        injector = SmtpInjector(m.reinject, timeout=m.reinject_timeout)
        deadline = time.monotonic() + m.reinject_timeout
        try:
            if recipients:
                return self.quarantine.release_for(entry_id, injector, recipients, deadline=deadline)
            return self.quarantine.release(entry_id, injector, deadline=deadline)
        except (FileMissing, ReleaseUnderWay, InjectError, StoreUnavailable) as exc:
            raise QuarantineError(f"not released: {exc}") from None
        except NotQuarantined as exc:
            raise NotHeld(str(exc)) from None

    def delete(self, entry_id: str, recipients: Sequence[str] | None = None) -> None:
        """Remove the entry and its file (or only ``recipients``' part of it)."""
        try:
            if recipients:
                self.quarantine.delete_for(entry_id, recipients)
            elif not self.quarantine.delete(entry_id):
                raise NotHeld(f"no quarantine entry {entry_id}")
        except NotQuarantined as exc:
            raise NotHeld(str(exc)) from None
        except ReleaseUnderWay as exc:
            raise QuarantineError(str(exc)) from None
        except StoreUnavailable as exc:
            raise QuarantineError(f"store unavailable: {exc}") from None


def open_quarantine(config: Config) -> MilterQuarantine:
    """Registered in the ``mailwarden.quarantine`` entry-point group."""
    return MilterQuarantine(config)
