"""The shared store, used from libmilter's threads through a small fixed pool.

libmilter runs every SMTP connection in a new thread.  :class:`PooledStore` runs
every store call in one of a few long-lived threads, so slow backends never hold
libmilter's threads longer than the pool allows, and offers :meth:`set_soon` for
writes nobody waits for (scan-cache entries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from mailwarden.store import Store, StoreWrapper

T = TypeVar("T")
log = logging.getLogger("mailwarden.milter")


def _log_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("store write failed: %s", exc)


class PooledStore(StoreWrapper):
    """A Store whose calls run in ``workers`` dedicated threads."""

    def __init__(self, store: Store, workers: int = 2) -> None:
        super().__init__(store)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mw-store")

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def set_soon(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store.set without waiting: for cache entries whose loss costs only a rescan."""
        future = self._pool.submit(self.store.set, key, value, ttl)
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        """Let queued calls finish, stop the workers, then close the store."""
        self._pool.shutdown(wait=True)
        self.store.close()
