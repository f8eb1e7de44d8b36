"""An in-process store with the real backends' semantics, for unit tests."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mailwarden.store.base import (
    Increment,
    StoreCall,
    StoreUnavailable,
    call_each,
    check_ttl,
    checked_sum,
    parse_int,
    wrong_type,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Entry:
    value: str | builtins.set[str]
    expires: float | None


class MemoryStore:
    """In-process store with the same semantics as the real backends (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._data: dict[str, _Entry] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._data)} keys)"

    def _now(self) -> float:
        if self._closed:
            raise StoreUnavailable("memory store is closed")
        return self._clock()

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expires is not None and entry.expires <= now:
            del self._data[key]
            return None
        return entry

    def _live_set(self, key: str, now: float) -> builtins.set[str] | None:
        entry = self._live(key, now)
        if entry is None:
            return None
        if not isinstance(entry.value, set):
            raise wrong_type(key)
        return entry.value

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        with self._lock:
            entry = self._live(key, self._now())
            if entry is None:
                return None
            if isinstance(entry.value, set):
                raise wrong_type(key)
            return entry.value

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        check_ttl(ttl)
        with self._lock:
            now = self._now()
            self._data[key] = _Entry(value, None if ttl is None else now + ttl)

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        check_ttl(ttl)
        with self._lock:
            now = self._now()
            if self._live(key, now) is not None:
                return False
            self._data[key] = _Entry(value, None if ttl is None else now + ttl)
            return True

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many live keys were removed."""
        with self._lock:
            now = self._now()
            removed = 0
            for key in keys:
                if self._live(key, now) is not None:
                    del self._data[key]
                    removed += 1
            return removed

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys, in order (None where absent)."""
        with self._lock:
            now = self._now()
            out: list[str | None] = []
            for key in keys:
                entry = self._live(key, now)
                value = None if entry is None else entry.value
                out.append(value if isinstance(value, str) else None)
            return out

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        return self.incr_many([(key, amount, ttl)])[0]

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """Several increments under one lock; nothing changes if any item fails."""
        for _, _, ttl in items:
            check_ttl(ttl)
        with self._lock:
            now = self._now()
            planned: dict[str, tuple[int, float | None]] = {}
            out: list[int] = []
            for key, amount, ttl in items:
                if key in planned:
                    current, expires = planned[key]
                else:
                    entry = self._live(key, now)
                    if entry is None:
                        current, expires = 0, None
                    elif isinstance(entry.value, set):
                        raise wrong_type(key)
                    else:
                        current, expires = parse_int(entry.value, key), entry.expires
                result = checked_sum(current, amount, key)
                if expires is None and ttl is not None:
                    expires = now + ttl
                planned[key] = (result, expires)
                out.append(result)
            for key, (result, expires) in planned.items():
                self._data[key] = _Entry(str(result), expires)
            return out

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds."""
        with self._lock:
            now = self._now()
            entry = self._live(key, now)
            if entry is None or entry.expires is None:
                return None
            return entry.expires - now

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key."""
        check_ttl(ttl)
        with self._lock:
            now = self._now()
            entry = self._live(key, now)
            if entry is None:
                return False
            entry.expires = now + ttl
            return True

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        check_ttl(ttl)
        with self._lock:
            now = self._now()
            current = self._live_set(key, now)
            if not members:
                return 0
            if current is None:
                current = set()
                self._data[key] = _Entry(current, None)
            entry = self._data[key]
            before = len(current)
            current.update(members)
            if entry.expires is None and ttl is not None:
                entry.expires = now + ttl
            return len(current) - before

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; an emptied set is deleted."""
        with self._lock:
            current = self._live_set(key, self._now())
            if current is None:
                return 0
            before = len(current)
            current.difference_update(members)
            if not current:
                del self._data[key]
            return before - len(current)

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set."""
        with self._lock:
            current = self._live_set(key, self._now())
            return set() if current is None else set(current)

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        with self._lock:
            current = self._live_set(key, self._now())
            return current is not None and member in current

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix``."""
        with self._lock:
            now = self._now()
            keys = [
                key
                for key, entry in self._data.items()
                if key.startswith(prefix) and (entry.expires is None or entry.expires > now)
            ]
        yield from sorted(keys)

    def ping(self) -> None:
        """Raise StoreUnavailable once closed."""
        self._now()

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """See :meth:`Store.call_many <mailwarden.store.base.Store.call_many>` (one after the other)."""
        return call_each(self, calls)

    def close(self) -> None:
        """Drop all data; later calls raise StoreUnavailable."""
        with self._lock:
            self._closed = True
            self._data.clear()
