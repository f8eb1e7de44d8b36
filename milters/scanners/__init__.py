"""Clients of the content scanners (clamd, spamd, rspamd) behind small interfaces.

Filters depend on :class:`VirusScanner` and :class:`SpamScanner` only; production
hands in :class:`~milters.scanners.clamd.ClamdScanner` and
:class:`~milters.scanners.spamd.SpamdScanner` or
:class:`~milters.scanners.rspamd.RspamdScanner` (``milter.spam_engine``), tests hand in fakes or the same
adapters pointed at fake socket servers.  Every failure to get an answer
(refused, timed out, nonsense) is a :class:`ScanError`; the filter turns it into
the recipient's configured failure action.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


class ScanError(Exception):
    """No usable answer from any upstream (down, timed out, refused the input)."""


@dataclass(frozen=True)
class VirusResult:
    """What the virus scanner said about one message."""

    infected: bool
    signature: str = ""
    upstream: str = ""
    cached: bool = False
    unscannable: str = ""
    """Set when the scanner could not look inside (its own limits, encryption)."""


@dataclass(frozen=True)
class SpamResult:
    """What the spam engine said about one message."""

    score: float
    symbols: tuple[str, ...] = ()
    """The rules that matched, the weightiest first where the engine says."""
    upstream: str = ""


@dataclass(frozen=True)
class SpamQuery:
    """What an engine may know about a message besides its text: the envelope and the
    client.  rspamd is told these in its request headers; spamd reads the relay from the
    ``Received:`` field put before the message and ignores the rest."""

    sender: str = ""
    recipients: tuple[str, ...] = ()
    client_address: str = ""
    client_name: str = ""
    """The client's verified host name; empty or ``unknown`` when it has none."""
    helo: str = ""
    auth_user: str = ""
    queue_id: str = ""
    receiver: str = ""
    """The MTA's own name."""
    sender_auth_done: bool = False
    """mailwarden checked SPF, DKIM, DMARC and ARC itself (the engine may skip them)."""


class VirusScanner(Protocol):
    """Scans a whole message (clamd parses MIME and archives itself)."""

    async def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        """Scan what ``stream()`` yields (called again per upstream tried); raise ScanError
        when no upstream answers by ``deadline`` (monotonic time)."""
        ...


class SpamScanner(Protocol):
    """Scores a whole message."""

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        """Score the message (``query``: its envelope and client, for engines that use them);
        raise ScanError when no upstream answers by ``deadline``."""
        ...


class ScanCache(Protocol):
    """Remembers virus scan results by body digest for a while."""

    async def get(self, digest: str) -> VirusResult | None:
        """A remembered result, or None."""
        ...

    async def put(self, digest: str, result: VirusResult) -> None:
        """Remember a definite result."""
        ...
