"""The store interfaces (:class:`Store`, :class:`AsyncStore`), their one error, and what
every backend shares: :class:`StoreWrapper` and the checks of ttls and counter values."""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "AsyncStore",
    "Increment",
    "Store",
    "StoreCall",
    "StoreUnavailable",
    "StoreWrapper",
    "call_each",
    "check_ttl",
    "checked_sum",
    "parse_int",
    "wrong_type",
]

_T = TypeVar("_T")

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_INTEGER_RE = re.compile(r"-?[0-9]{1,20}")


class StoreUnavailable(Exception):
    """The state backend cannot be reached or failed; treat as a temporary failure."""


Increment = tuple[str, int, float | None]
"""One counter change for :meth:`Store.incr_many`: key, amount and ttl (as for ``incr``)."""


@dataclass(frozen=True, slots=True)
class StoreCall:
    """One :class:`Store` operation to make later: its method name and arguments."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Store(Protocol):
    """Shared state: string keys with optional expiry, string values, string sets."""

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        ...

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (any previous value or set is replaced).

        ``ttl=None`` removes any previous expiry.
        """
        ...

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; True if it was stored."""
        ...

    def delete(self, *keys: str) -> int:
        """Delete keys (strings or sets); return how many live keys were removed."""
        ...

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount`` to an integer value and return the new value.

        A missing or expired key starts from 0. ``ttl`` is applied only when the key
        has no expiry (in particular when it is created); an existing expiry is never
        extended, which gives fixed-window counters.
        """
        ...

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys in one round trip, in order.

        None where a key is absent, expired or holds a set (like Redis MGET).
        """
        ...

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """Several :meth:`incr` calls as one atomic step (one round trip); new values in order.

        A type or value error in any item leaves every counter unchanged.
        """
        ...

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds; None if absent or without expiry."""
        ...

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key; False if the key is absent."""
        ...

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; return how many were new.

        ``ttl`` is applied only when the set has no expiry (e.g. when created).
        """
        ...

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; return how many were removed.

        A set that becomes empty is deleted.
        """
        ...

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set (empty if absent or expired)."""
        ...

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        ...

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix`` (order unspecified; may be large)."""
        ...

    def ping(self) -> None:
        """Check the backend is usable; raise StoreUnavailable if not."""
        ...

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """Several operations, made in order, in as few round trips as the backend allows.

        Each result is what the operation returns, or the exception it raised (returned,
        not raised), so one failed operation does not hide the others' results. The
        operations are not one atomic step.
        """
        ...

    def close(self) -> None:
        """Release backend resources; later calls raise StoreUnavailable."""
        ...


@runtime_checkable
class AsyncStore(Protocol):
    """:class:`Store` for code on an event loop: the same operations and semantics, awaited.

    Every method is a coroutine except :meth:`scan`, an async iterator. Errors are
    those of :class:`Store` (StoreUnavailable, TypeError, ValueError). An instance
    belongs to one event loop.
    """

    async def get(self, key: str) -> str | None:
        """See :meth:`Store.get`."""
        ...

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """See :meth:`Store.set`."""
        ...

    async def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """See :meth:`Store.add`."""
        ...

    async def delete(self, *keys: str) -> int:
        """See :meth:`Store.delete`."""
        ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See :meth:`Store.incr`."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """See :meth:`Store.get_many`."""
        ...

    async def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """See :meth:`Store.incr_many`."""
        ...

    async def ttl(self, key: str) -> float | None:
        """See :meth:`Store.ttl`."""
        ...

    async def expire(self, key: str, ttl: float) -> bool:
        """See :meth:`Store.expire`."""
        ...

    async def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """See :meth:`Store.sadd`."""
        ...

    async def srem(self, key: str, *members: str) -> int:
        """See :meth:`Store.srem`."""
        ...

    async def smembers(self, key: str) -> builtins.set[str]:
        """See :meth:`Store.smembers`."""
        ...

    async def sismember(self, key: str, member: str) -> bool:
        """See :meth:`Store.sismember`."""
        ...

    def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`Store.scan` (``async for key in store.scan(prefix)``)."""
        ...

    async def ping(self) -> None:
        """See :meth:`Store.ping`."""
        ...

    async def close(self) -> None:
        """See :meth:`Store.close`."""
        ...


class StoreWrapper:
    """A Store that forwards every call to ``store`` through :meth:`_call`.

    Subclasses change how calls are made (fail fast while the backend is down, run
    them on other threads...) by overriding ``_call`` alone.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return fn(*args, **kwargs)

    def get(self, key: str) -> str | None:
        """See :class:`Store`."""
        return self._call(self.store.get, key)

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """See :class:`Store`."""
        return self._call(self.store.get_many, keys)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """See :class:`Store`."""
        self._call(self.store.set, key, value, ttl)

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """See :class:`Store`."""
        return self._call(self.store.add, key, value, ttl)

    def delete(self, *keys: str) -> int:
        """See :class:`Store`."""
        return self._call(self.store.delete, *keys)

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See :class:`Store`."""
        return self._call(self.store.incr, key, amount, ttl)

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """See :class:`Store`."""
        return self._call(self.store.incr_many, items)

    def ttl(self, key: str) -> float | None:
        """See :class:`Store`."""
        return self._call(self.store.ttl, key)

    def expire(self, key: str, ttl: float) -> bool:
        """See :class:`Store`."""
        return self._call(self.store.expire, key, ttl)

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """See :class:`Store`."""
        return self._call(self.store.sadd, key, *members, ttl=ttl)

    def srem(self, key: str, *members: str) -> int:
        """See :class:`Store`."""
        return self._call(self.store.srem, key, *members)

    def smembers(self, key: str) -> builtins.set[str]:
        """See :class:`Store`."""
        return self._call(self.store.smembers, key)

    def sismember(self, key: str, member: str) -> bool:
        """See :class:`Store`."""
        return self._call(self.store.sismember, key, member)

    def scan(self, prefix: str = "") -> Iterator[str]:
        """See :class:`Store` (the keys are listed in one call)."""
        return iter(self._call(lambda: list(self.store.scan(prefix))))

    def ping(self) -> None:
        """See :class:`Store`."""
        self._call(self.store.ping)

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """See :class:`Store` (one :meth:`_call` for all of them)."""
        return self._call(self.store.call_many, calls)

    def close(self) -> None:
        """See :class:`Store` (closes the wrapped store directly)."""
        self.store.close()


def call_each(store: Store, calls: Sequence[StoreCall]) -> list[Any]:
    """:meth:`Store.call_many` one operation after the other (for backends without round trips)."""
    results: list[Any] = []
    for call in calls:
        try:
            results.append(getattr(store, call.name)(*call.args, **call.kwargs))
        except (StoreUnavailable, TypeError, ValueError) as exc:
            results.append(exc)
    return results


# ---------------------------------------------------------------------------
# Checks every backend makes the same way
# ---------------------------------------------------------------------------


def check_ttl(ttl: float | None) -> None:
    """Refuse a ttl that is not a positive, finite number of seconds (ValueError)."""
    if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


def parse_int(value: str, key: str) -> int:
    """The counter in ``value``, as Redis reads one (ValueError if it is none)."""
    if not _INTEGER_RE.fullmatch(value):
        raise ValueError(f"value of {key!r} is not an integer")
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"value of {key!r} is out of the 64-bit integer range")
    return number


def checked_sum(current: int, amount: int, key: str) -> int:
    """``current + amount``, or ValueError when it leaves the 64-bit range (as in Redis)."""
    result = current + amount
    if not INT64_MIN <= result <= INT64_MAX:
        raise ValueError(f"incrementing {key!r} would overflow a 64-bit integer")
    return result


def wrong_type(key: str) -> TypeError:
    """The error for a string key used as a set, or the reverse."""
    return TypeError(f"key {key!r} holds the wrong kind of value")
