"""A bounded map whose entries expire: TTL per entry, least recently used out first."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["TtlLru"]

K = TypeVar("K")
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """At most ``size`` entries, each until its own expiry time; when full, the least
    recently used entry is dropped. Times are whatever clock the caller reads.

    Not thread-safe: callers hold their own lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value of ``key`` if it has not expired at ``now`` (it becomes the most
        recently used), else None (an expired entry is dropped)."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key: K, value: V, expires: float) -> None:
        """Keep ``value`` until ``expires`` (nothing is kept when ``size`` is 0)."""
        if self.size <= 0:
            return
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget ``key``."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
