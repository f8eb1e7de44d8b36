"""The shared store, used from libmilter's threads through a small fixed pool.

libmilter runs every SMTP connection in a new thread.  ``SQLiteStore`` keeps one
connection per thread, so calling it from those threads would open (and keep) a
database connection per SMTP connection.  :class:`PooledStore` runs every call
in one of a few long-lived threads instead, so the milter holds a fixed number of
connections whatever the traffic.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from mailwarden.store import Store

T = TypeVar("T")
log = logging.getLogger("mailwarden.milter")


def _log_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("store write failed: %s", exc)


class PooledStore:
    """A Store whose calls run in ``workers`` dedicated threads."""

    def __init__(self, store: Store, workers: int = 2) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mw-store")

    def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def get(self, key: str) -> str | None:
        """See Store.get."""
        return self._run(self.store.get, key)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """See Store.set."""
        self._run(self.store.set, key, value, ttl)

    def set_soon(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store.set without waiting: for cache entries whose loss costs only a rescan."""
        future = self._pool.submit(self.store.set, key, value, ttl)
        future.add_done_callback(_log_failure)

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """See Store.add."""
        return self._run(self.store.add, key, value, ttl)

    def delete(self, *keys: str) -> int:
        """See Store.delete."""
        return self._run(self.store.delete, *keys)

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See Store.incr."""
        return self._run(self.store.incr, key, amount, ttl)

    def ttl(self, key: str) -> float | None:
        """See Store.ttl."""
        return self._run(self.store.ttl, key)

    def expire(self, key: str, ttl: float) -> bool:
        """See Store.expire."""
        return self._run(self.store.expire, key, ttl)

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """See Store.sadd."""
        return self._run(self.store.sadd, key, *members, ttl=ttl)

    def srem(self, key: str, *members: str) -> int:
        """See Store.srem."""
        return self._run(self.store.srem, key, *members)

    def smembers(self, key: str) -> builtins.set[str]:
        """See Store.smembers."""
        return self._run(self.store.smembers, key)

    def sismember(self, key: str, member: str) -> bool:
        """See Store.sismember."""
        return self._run(self.store.sismember, key, member)

    def scan(self, prefix: str = "") -> Iterator[str]:
        """See Store.scan (collected in the worker, then iterated here)."""
        return iter(self._run(lambda: list(self.store.scan(prefix))))

    def ping(self) -> None:
        """See Store.ping."""
        self._run(self.store.ping)

    def close(self) -> None:
        """Let queued calls finish, stop the workers, then close the store.

        In that order: SQLiteStore.close() closes every thread's connection, and a
        worker still writing with one would crash the interpreter.
        """
        self._pool.shutdown(wait=True)
        self.store.close()
