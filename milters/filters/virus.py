"""Virus scan with clamd, once per message, cached by body digest.

The same mail to 500 recipients, or resent by a botnet with new headers, is
scanned once: the cache key is the digest of the body plus the header fields
that decide how the body is decoded (so a changed Content-Type cannot reuse a
"clean" answer for differently decoded content).  Only definite answers are
cached.  With the Redis store (a cluster) the cache is shared by every node;
with SQLite (a single node) it is held in the milter process, which is the
node's only user of it, so a lookup costs no database round trip.

Too big, or not fully scannable (encrypted or bomb archives, too many parts),
goes to the recipient's ``unscannable_action``; clamd down or too slow goes to
``virus_failure_action``: the default of both is a temporary failure, never
delivery as if scanned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from mailwarden.cache import TtlLru
from mailwarden.catalogue import Service
from mailwarden.store import StoreUnavailable

if TYPE_CHECKING:
    from mailwarden.store import AsyncStore
from milters.filters import Backends, Context, backend_failed, plan_notices, unscannable
from milters.scanners import ScanCache, ScanError, VirusResult, VirusScanner
from milters.verdict import Action, RecipientOutcome

log = logging.getLogger("mailwarden.milter.virus")

CACHE_PREFIX = "av:"
_ACTIONS = {"reject": Action.REJECT, "discard": Action.DISCARD, "quarantine": Action.QUARANTINE}


def _encode(result: VirusResult) -> str:
    return "FOUND " + result.signature if result.infected else "OK"


def _decode(value: str | None) -> VirusResult | None:
    if value == "OK":
        return VirusResult(infected=False, upstream="cache", cached=True)
    if value and value.startswith("FOUND "):
        return VirusResult(infected=True, signature=value[6:], upstream="cache", cached=True)
    return None


class StoreScanCache:
    """The cache in the shared store (``av:<digest>``), for a cluster of nodes."""

    def __init__(self, store: AsyncStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl

    async def get(self, digest: str) -> VirusResult | None:
        """Ask the store; an unavailable store is a miss (the message is scanned)."""
        try:
            return _decode(await self.store.get(CACHE_PREFIX + digest))
        except StoreUnavailable as exc:
            log.warning("scan cache unavailable, scanning: %s", exc)
            return None

    async def put(self, digest: str, result: VirusResult) -> None:
        """Write (a lost entry only costs a rescan)."""
        try:
            await self.store.set(CACHE_PREFIX + digest, _encode(result), ttl=self.ttl)
        except StoreUnavailable as exc:
            log.warning("scan cache not written: %s", exc)


class LocalScanCache:
    """The cache in the milter process (TTL + LRU), for a single node."""

    def __init__(self, ttl: float, size: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self.entries: TtlLru[str, str] = TtlLru(size)

    async def get(self, digest: str) -> VirusResult | None:
        """A result younger than the TTL."""
        return _decode(self.entries.get(digest, self.clock()))

    async def put(self, digest: str, result: VirusResult) -> None:
        """Remember; the least recently used entries go first when full."""
        self.entries.put(digest, _encode(result), self.clock() + self.ttl)


class VirusFilter:
    """Scans with a VirusScanner and applies each recipient's virus settings."""

    name: ClassVar[str] = "virus"
    service: ClassVar[Service | None] = Service.VIRUS_SCAN
    skipped_for_allowed_senders: ClassVar[bool] = False

    def __init__(self, scanner: VirusScanner, cache: ScanCache | None = None, *,
                 max_size: int = 25 * 1024 * 1024) -> None:
        self.scanner = scanner
        self.cache = cache
        self.max_size = max_size
        self.hits = 0
        """Scan-cache lookups answered (metrics)."""
        self.misses = 0

    @classmethod
    def build(cls, backends: Backends) -> VirusFilter:
        """clamd, the scan cache and ``milter.clamd_max_size``."""
        return cls(backends.virus_scanner, backends.scan_cache, max_size=backends.config.clamd_max_size)

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Scan (or recall the scan of) the message and set every recipient's outcome."""
        message = ctx.message
        if message.size > self.max_size:
            ctx.find("virus", "too-big")
            for outcome in outcomes:
                unscannable(outcome, f"{message.size} bytes, over the scan limit of {self.max_size}",
                            lasting=True)
            return
        try:
            result = await self._result(ctx)
        except ScanError as exc:
            ctx.find("virus", "error")
            for outcome in outcomes:
                backend_failed(outcome, "virus_failure_action", f"virus scan failed: {exc}")
            return
        ctx.find("virus", ("FOUND " + result.signature if result.infected else
                           "unscannable " + result.signature if result.unscannable else "clean")
                 + (" (cached)" if result.cached else ""))
        if result.infected:
            reason = f"virus {result.signature}"
            for outcome in outcomes:
                outcome.block(_ACTIONS.get(outcome.policy.get("virus_action"), Action.REJECT), reason)
                plan_notices(ctx, outcome, "virus", reason, (result.signature,))
            return
        problems = [u.reason for u in message.unscannable if u.virus]
        if result.unscannable:
            problems.insert(0, f"clamd: {result.unscannable}")
        if problems:
            for outcome in outcomes:
                # Only clamd's scan-time limit depends on its load: a retry may pass it.
                unscannable(outcome, problems[0],
                            lasting=len(problems) > 1 or not result.unscannable.endswith(".MaxScanTime"))

    async def _result(self, ctx: Context) -> VirusResult:
        """The cached answer for this body, else clamd's (remembered unless unscannable)."""
        digest = ctx.message.body_digest
        if self.cache is not None:
            if (cached := await self.cache.get(digest)) is not None:
                self.hits += 1
                return cached
            self.misses += 1
        result = await self.scanner.scan(ctx.message.stream, ctx.deadline)
        if self.cache is not None and not result.unscannable:
            await self.cache.put(digest, result)
        return result
