"""Shared short-lived state for the mailwarden daemons.

One small key/value + set interface (:class:`Store`) with three implementations:

* :class:`SQLiteStore` (``sqlite.py``) - embedded default for a single node; several
  processes (and threads) may share one database file.
* :class:`RedisStore` (``redis.py``) - shared state for a cluster of identical nodes,
  over redis-py.
* :class:`MemoryStore` (``memory.py``) - in-process fake with the same semantics, for
  unit tests.

Code on an event loop uses :class:`AsyncStore`, the same operations awaited:
:class:`AsyncRedisStore` (``redis.asyncio``) for Redis, :class:`ThreadedStore` (a
blocking store run in the loop's executor) for the others. :func:`open_store` and
:func:`open_async_store` open the configured backend.

All values are ``str``. TTLs are seconds as ``float`` (``None`` means no expiry)
and must be positive. Expired keys are absent for every operation. Any failure
to reach or use the backend raises :class:`StoreUnavailable`; callers map it to
a temporary failure. Using a string key as a set (or the reverse) raises
``TypeError``; incrementing a non-integer value raises ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mailwarden.store.base import AsyncStore, Increment, Store, StoreCall, StoreUnavailable, StoreWrapper
from mailwarden.store.memory import MemoryStore
from mailwarden.store.redis import AsyncRedisStore, RedisStore, SentinelSettings
from mailwarden.store.sqlite import SQLiteStore
from mailwarden.store.threaded import ThreadedStore

if TYPE_CHECKING:
    from mailwarden.config import StoreConfig

__all__ = [
    "AsyncRedisStore",
    "AsyncStore",
    "Increment",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "SentinelSettings",
    "Store",
    "StoreCall",
    "StoreUnavailable",
    "StoreWrapper",
    "ThreadedStore",
    "async_store_of",
    "open_async_store",
    "open_store",
    "sentinel_of",
    "store_of",
]

BACKENDS = ("sqlite", "redis", "memory")


def _unknown(backend: str) -> ValueError:
    return ValueError(f"unknown store backend {backend!r} (expected sqlite, redis or memory)")


def open_store(
    backend: str,
    *,
    sqlite_path: str = "",
    redis_url: str = "",
    key_prefix: str = "mw:",
    timeout: float = 1.0,
    sentinel: SentinelSettings | None = None,
) -> Store:
    """Open the configured backend: ``"sqlite"``, ``"redis"`` or ``"memory"``.

    ``timeout`` is the Redis socket timeout or the SQLite busy timeout, in seconds.
    Only the chosen backend's location is needed; ``key_prefix`` is Redis's. With
    ``sentinel``, Redis is the primary the Sentinels name (``redis_url`` gives its
    password and database).
    """
    if backend == "sqlite":
        return SQLiteStore(sqlite_path, busy_timeout=timeout)
    if backend == "redis" and sentinel is not None:
        return RedisStore.from_sentinel(sentinel, redis_url, key_prefix=key_prefix, socket_timeout=timeout)
    if backend == "redis":
        return RedisStore(redis_url, key_prefix=key_prefix, socket_timeout=timeout)
    if backend == "memory":
        return MemoryStore()
    raise _unknown(backend)


def open_async_store(
    backend: str,
    *,
    sqlite_path: str = "",
    redis_url: str = "",
    key_prefix: str = "mw:",
    timeout: float = 1.0,
    sentinel: SentinelSettings | None = None,
) -> AsyncStore:
    """The :class:`AsyncStore` of the configured backend, chosen as :func:`open_store` does.

    Redis: an :class:`AsyncRedisStore` (use it on one event loop). SQLite and memory:
    the blocking store, opened now, in a :class:`ThreadedStore` (the running loop's
    default executor).
    """
    if backend == "redis" and sentinel is not None:
        return AsyncRedisStore.from_sentinel(sentinel, redis_url, key_prefix=key_prefix,
                                             socket_timeout=timeout)
    if backend == "redis":
        return AsyncRedisStore(redis_url, key_prefix=key_prefix, socket_timeout=timeout)
    if backend in BACKENDS:
        return ThreadedStore(open_store(backend, sqlite_path=sqlite_path, redis_url=redis_url,
                                        key_prefix=key_prefix, timeout=timeout))
    raise _unknown(backend)


def sentinel_of(cfg: StoreConfig) -> SentinelSettings | None:
    """The ``[store]`` section's Sentinel settings (None without ``sentinels``)."""
    if not cfg.sentinels:
        return None
    password = ""
    if cfg.sentinel_password_file:
        password = Path(cfg.sentinel_password_file).read_text(encoding="utf-8").strip()
    return SentinelSettings(tuple(cfg.sentinels), cfg.sentinel_service, password)


def store_of(cfg: StoreConfig) -> Store:
    """The shared store the ``[store]`` section describes (every daemon and the CLI open it here)."""
    return open_store(cfg.backend, sqlite_path=cfg.sqlite_path, redis_url=cfg.redis_url,
                      key_prefix=cfg.key_prefix, timeout=cfg.timeout, sentinel=sentinel_of(cfg))


def async_store_of(cfg: StoreConfig) -> AsyncStore:
    """:func:`store_of` for code on an event loop."""
    return open_async_store(cfg.backend, sqlite_path=cfg.sqlite_path, redis_url=cfg.redis_url,
                            key_prefix=cfg.key_prefix, timeout=cfg.timeout, sentinel=sentinel_of(cfg))
