"""An :class:`~mailwarden.store.base.AsyncStore` over a blocking store (SQLite, memory)."""

from __future__ import annotations

import asyncio
import builtins
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from mailwarden.store.base import Increment, Store

__all__ = ["ThreadedStore"]

_T = TypeVar("_T")


class ThreadedStore:
    """Each call of a blocking :class:`~mailwarden.store.base.Store` runs in an executor,
    so the event loop never waits on a lock or the disk.

    ``executor=None`` is the running loop's default executor (the daemon makes its one
    thread pool the default). The store's own errors pass through unchanged. A call
    whose caller is cancelled still runs to its end in its thread. :meth:`close`
    closes the wrapped store.
    """

    def __init__(self, store: Store, executor: Executor | None = None) -> None:
        self.store = store
        self.executor = executor

    def __repr__(self) -> str:
        return f"ThreadedStore({self.store!r})"

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def get(self, key: str) -> str | None:
        """See :meth:`Store.get <mailwarden.store.base.Store.get>`."""
        return await self._call(self.store.get, key)

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """See :meth:`Store.get_many <mailwarden.store.base.Store.get_many>`."""
        return await self._call(self.store.get_many, keys)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """See :meth:`Store.set <mailwarden.store.base.Store.set>`."""
        await self._call(self.store.set, key, value, ttl)

    async def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """See :meth:`Store.add <mailwarden.store.base.Store.add>`."""
        return await self._call(self.store.add, key, value, ttl)

    async def delete(self, *keys: str) -> int:
        """See :meth:`Store.delete <mailwarden.store.base.Store.delete>`."""
        return await self._call(self.store.delete, *keys)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See :meth:`Store.incr <mailwarden.store.base.Store.incr>`."""
        return await self._call(self.store.incr, key, amount, ttl)

    async def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """See :meth:`Store.incr_many <mailwarden.store.base.Store.incr_many>`."""
        return await self._call(self.store.incr_many, items)

    async def ttl(self, key: str) -> float | None:
        """See :meth:`Store.ttl <mailwarden.store.base.Store.ttl>`."""
        return await self._call(self.store.ttl, key)

    async def expire(self, key: str, ttl: float) -> bool:
        """See :meth:`Store.expire <mailwarden.store.base.Store.expire>`."""
        return await self._call(self.store.expire, key, ttl)

    async def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """See :meth:`Store.sadd <mailwarden.store.base.Store.sadd>`."""
        return await self._call(self.store.sadd, key, *members, ttl=ttl)

    async def srem(self, key: str, *members: str) -> int:
        """See :meth:`Store.srem <mailwarden.store.base.Store.srem>`."""
        return await self._call(self.store.srem, key, *members)

    async def smembers(self, key: str) -> builtins.set[str]:
        """See :meth:`Store.smembers <mailwarden.store.base.Store.smembers>`."""
        return await self._call(self.store.smembers, key)

    async def sismember(self, key: str, member: str) -> bool:
        """See :meth:`Store.sismember <mailwarden.store.base.Store.sismember>`."""
        return await self._call(self.store.sismember, key, member)

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`Store.scan <mailwarden.store.base.Store.scan>` (listed in one call)."""
        for key in await self._call(lambda: list(self.store.scan(prefix))):
            yield key

    async def ping(self) -> None:
        """See :meth:`Store.ping <mailwarden.store.base.Store.ping>`."""
        await self._call(self.store.ping)

    async def close(self) -> None:
        """Close the wrapped store."""
        await self._call(self.store.close)
