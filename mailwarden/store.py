"""Shared short-lived state for the mailwarden daemons.

One small key/value + set interface (:class:`Store`) with three implementations:

* :class:`SQLiteStore` - embedded default for a single node; several processes
  (and threads) may share one database file.
* :class:`RedisStore` - shared state for a cluster of identical nodes.
* :class:`MemoryStore` - in-process fake with the same semantics, for unit tests.

All values are ``str``. TTLs are seconds as ``float`` (``None`` means no expiry)
and must be positive. Expired keys are absent for every operation. Any failure
to reach or use the backend raises :class:`StoreUnavailable`; callers map it to
a temporary failure. Using a string key as a set (or the reverse) raises
``TypeError``; incrementing a non-integer value raises ``ValueError``.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import math
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from mailwarden.resp import (
    RedisAddress,
    RedisConnection,
    RedisConnectionLost,
    RedisError,
    RedisReplyError,
)

__all__ = [
    "Increment",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "StoreWrapper",
    "open_store",
]

_T = TypeVar("_T")
_log = logging.getLogger("mailwarden.store")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INTEGER_RE = re.compile(r"-?[0-9]{1,20}")


class StoreUnavailable(Exception):
    """The state backend cannot be reached or failed; treat as a temporary failure."""


Increment = tuple[str, int, float | None]
"""One counter change for :meth:`Store.incr_many`: key, amount and ttl (as for ``incr``)."""


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

    def close(self) -> None:
        """Release backend resources; later calls raise StoreUnavailable."""
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

    def close(self) -> None:
        """See :class:`Store` (closes the wrapped store directly)."""
        self.store.close()


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


def _parse_int(value: str, key: str) -> int:
    if not _INTEGER_RE.fullmatch(value):
        raise ValueError(f"value of {key!r} is not an integer")
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"value of {key!r} is out of the 64-bit integer range")
    return number


def _checked_sum(current: int, amount: int, key: str) -> int:
    result = current + amount
    if not _INT64_MIN <= result <= _INT64_MAX:
        raise ValueError(f"incrementing {key!r} would overflow a 64-bit integer")
    return result


def _wrong_type(key: str) -> TypeError:
    return TypeError(f"key {key!r} holds the wrong kind of value")


# ---------------------------------------------------------------------------
# In-memory fake
# ---------------------------------------------------------------------------


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
            raise _wrong_type(key)
        return entry.value

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        with self._lock:
            entry = self._live(key, self._now())
            if entry is None:
                return None
            if isinstance(entry.value, set):
                raise _wrong_type(key)
            return entry.value

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        _check_ttl(ttl)
        with self._lock:
            now = self._now()
            self._data[key] = _Entry(value, None if ttl is None else now + ttl)

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        _check_ttl(ttl)
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
            _check_ttl(ttl)
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
                        raise _wrong_type(key)
                    else:
                        current, expires = _parse_int(entry.value, key), entry.expires
                result = _checked_sum(current, amount, key)
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
        _check_ttl(ttl)
        with self._lock:
            now = self._now()
            entry = self._live(key, now)
            if entry is None:
                return False
            entry.expires = now + ttl
            return True

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        _check_ttl(ttl)
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

    def close(self) -> None:
        """Drop all data; later calls raise StoreUnavailable."""
        with self._lock:
            self._closed = True
            self._data.clear()


# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------

_KIND_STR = 0
_KIND_SET = 1
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY NOT NULL,
    kind INTEGER NOT NULL,
    value TEXT,
    expires REAL
);
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
"""
_UPSERT = (
    "INSERT INTO kv (key, kind, value, expires) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, value = excluded.value, "
    "expires = excluded.expires"
)
_SCAN_BATCH = 500
_WAL_COMMIT_CHECKPOINT = 8000
"""Log pages after which a commit checkpoints (SQLite's default is 1000)."""
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the write-ahead log is cut back to after a checkpoint."""
_BUSY_FIRST_DELAY = 0.00005
_BUSY_MAX_DELAY = 0.002
_PURGE_EVERY = 100
_PURGE_LIMIT = 200

# Connections inherited from a parent process must never be used or closed in the
# child (SQLite forbids carrying connections across fork); they are parked here.
_FORK_ORPHANS: list[sqlite3.Connection] = []


# The checkpoint threads call into SQLite without the application knowing. A fork
# taken while one of them holds one of SQLite's internal mutexes would leave the
# child's copy locked for ever, so fork waits until no checkpoint is running.
_CHECKPOINT_FORK_LOCK = threading.Lock()
os.register_at_fork(
    before=_CHECKPOINT_FORK_LOCK.acquire,
    after_in_parent=_CHECKPOINT_FORK_LOCK.release,
    after_in_child=_CHECKPOINT_FORK_LOCK.release,
)


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the write-ahead log back into the database, without waiting for readers."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _checkpoint_loop(
    store: weakref.ref[SQLiteStore], path: Path, interval: float, busy_timeout: float,
    stop: threading.Event,
) -> None:
    """Checkpoint ``path`` every ``interval`` seconds until ``stop`` or the store is gone."""
    conn: sqlite3.Connection | None = None
    failed = False
    try:
        while not stop.wait(interval) and store() is not None:
            error: sqlite3.Error | None = None
            with _CHECKPOINT_FORK_LOCK:
                try:
                    if conn is None:
                        conn = sqlite3.connect(path, timeout=busy_timeout,
                                               isolation_level=None, check_same_thread=False)
                        conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
                    _checkpoint(conn)
                except sqlite3.Error as exc:
                    error = exc
            if error is not None and not failed:
                _log.warning("sqlite store %s: checkpoint failed: %s", path, error)
            failed = error is not None
    finally:
        if conn is not None:
            with _CHECKPOINT_FORK_LOCK:
                with suppress(sqlite3.Error):
                    _checkpoint(conn)
                conn.close()


class SQLiteStore:
    """Store in one SQLite file (WAL mode), shared by the threads and processes of a node.

    Threads borrow connections from a bounded pool (``max_connections``; a thread
    that finds them all busy waits up to ``busy_timeout``), so a daemon that starts
    a thread per SMTP connection still holds a fixed number of database handles.
    Read-modify-write operations run inside ``BEGIN IMMEDIATE`` so that concurrent
    processes serialise on the write lock; a lock held longer than ``busy_timeout``
    raises StoreUnavailable (lock waits are retried in steps of 50 µs to 2 ms). Each
    process checkpoints the write-ahead log from a background thread every
    ``checkpoint_interval`` seconds (0: let SQLite do it during commits, which
    stalls the committing caller for milliseconds). Expired rows are ignored by
    every query and purged a few at a time during writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        max_connections: int = 8,
        checkpoint_interval: float = 0.5,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._max = max_connections
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[sqlite3.Connection] = []
        self._open = 0
        self._writes = 0
        self._closed = False
        self._checkpoint_interval = checkpoint_interval
        self._checkpointer_pid = 0
        self._stop_checkpoints = threading.Event()
        with self._connection():
            pass  # create the file and schema now, so a bad path fails at start

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"sqlite store {self._path}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._unavailable(exc) from exc
        try:
            # Processes that open a new file together race to switch it to WAL and to
            # create the schema; the loser sees "database is locked" at once.
            self._busy_retry(lambda: self._prepare(conn))
        except (OSError, sqlite3.Error) as exc:
            conn.close()
            raise self._unavailable(exc) from exc
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Put a new connection in WAL mode, create the schema if missing, set the pragmas."""
        conn.execute("PRAGMA synchronous=NORMAL")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode (got {mode!r})")
        if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{_SCHEMA}"
                    f"PRAGMA user_version = {_SCHEMA_VERSION};\nCOMMIT;"
                )
            except BaseException:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        if self._checkpoint_interval > 0:
            # Checkpoints (which copy the log back and fsync) run on a background
            # thread; a commit checkpoints only as a backstop, when the log has
            # grown large (the log restarts only after a commit-time checkpoint).
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_COMMIT_CHECKPOINT}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        # Lock waits are retried by _busy_retry in short steps; SQLite's own busy
        # handler sleeps a millisecond or more at a time, a long stall for a daemon
        # answering on its event loop.
        conn.execute("PRAGMA busy_timeout = 0")

    def _busy_retry(self, fn: Callable[[], _T]) -> _T:
        """``fn()``, retried while the database is locked, for up to ``busy_timeout``."""
        deadline = 0.0
        delay = _BUSY_FIRST_DELAY
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self._busy_timeout
                if now >= deadline:
                    raise
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, _BUSY_MAX_DELAY)

    def _start_checkpoints(self) -> None:
        """Start this process's checkpoint thread (once per process, on the first write)."""
        with self._cond:
            if self._checkpointer_pid == os.getpid() or self._closed:
                return
            self._checkpointer_pid = os.getpid()
            self._stop_checkpoints = threading.Event()
        threading.Thread(
            target=_checkpoint_loop,
            args=(weakref.ref(self), self._path, self._checkpoint_interval, self._busy_timeout,
                  self._stop_checkpoints),
            name=f"mw-sqlite-checkpoint {self._path}", daemon=True,
        ).start()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections (never touch them)."""
        _FORK_ORPHANS.extend(self._idle)
        self._idle = []
        self._open = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()

    def _acquire(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._after_fork()
        with self._cond:
            deadline: float | None = None
            while True:
                if self._closed:
                    raise StoreUnavailable(f"sqlite store {self._path}: store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max:
                    self._open += 1
                    break
                now = time.monotonic()
                deadline = deadline or now + self._busy_timeout
                if now >= deadline:
                    raise StoreUnavailable(
                        f"sqlite store {self._path}: all {self._max} connections busy "
                        f"for {self._busy_timeout:g} s"
                    )
                self._cond.wait(deadline - now)
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, conn: sqlite3.Connection) -> None:
        if self._pid != os.getpid():
            _FORK_ORPHANS.append(conn)  # borrowed in the parent, returned in a child
            return
        with self._cond:
            if self._closed:
                self._open -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._cond.notify()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for the body."""
        conn = self._acquire()
        try:
            yield conn
        finally:
            self._release(conn)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Run the body in a write transaction; sqlite errors become StoreUnavailable."""
        with self._connection() as conn:
            try:
                self._busy_retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc
            try:
                yield conn
                self._writes += 1
                if self._checkpointer_pid != self._pid and self._checkpoint_interval > 0:
                    self._start_checkpoints()
                if self._writes % _PURGE_EVERY == 0:
                    self._purge(conn, _PURGE_LIMIT)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._unavailable(exc) from exc
                raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        conn = self._acquire()
        try:
            return self._busy_retry(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            self._release(conn)

    def _purge(self, conn: sqlite3.Connection, limit: int) -> int:
        rows = conn.execute(
            "SELECT key, kind FROM kv WHERE expires IS NOT NULL AND expires <= ? LIMIT ?",
            (self._clock(), limit),
        ).fetchall()
        conn.executemany(
            "DELETE FROM members WHERE key = ?", [(k,) for k, kind in rows if kind == _KIND_SET]
        )
        conn.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k, _ in rows])
        return len(rows)

    def purge_expired(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired keys now; return how many were deleted."""
        with self._tx() as conn:
            return self._purge(conn, limit)

    @staticmethod
    def _live_row(conn: sqlite3.Connection, key: str, now: float) -> Any:
        return conn.execute(
            "SELECT kind, value, expires FROM kv "
            "WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, now),
        ).fetchone()

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        rows = self._query(
            "SELECT kind, value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, self._clock()),
        )
        if not rows:
            return None
        kind, value = rows[0]
        if kind != _KIND_STR:
            raise _wrong_type(key)
        return str(value)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        _check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            conn.execute("DELETE FROM members WHERE key = ?", (key,))
            conn.execute(_UPSERT, (key, _KIND_STR, value, None if ttl is None else now + ttl))

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        _check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            if self._live_row(conn, key, now) is not None:
                return False
            conn.execute("DELETE FROM members WHERE key = ?", (key,))
            conn.execute(_UPSERT, (key, _KIND_STR, value, None if ttl is None else now + ttl))
            return True

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many live keys were removed."""
        if not keys:
            return 0
        with self._tx() as conn:
            now = self._clock()
            removed = 0
            for key in keys:
                removed += self._live_row(conn, key, now) is not None
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
                conn.execute("DELETE FROM members WHERE key = ?", (key,))
            return removed

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys in one query, in order (None where absent)."""
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for start in range(0, len(unique), _SCAN_BATCH):
            chunk = unique[start : start + _SCAN_BATCH]
            marks = ",".join("?" * len(chunk))
            rows = self._query(
                f"SELECT key, kind, value FROM kv WHERE key IN ({marks}) "  # noqa: S608 - placeholders
                "AND (expires IS NULL OR expires > ?)",
                (*chunk, self._clock()),
            )
            found.update((key, str(value)) for key, kind, value in rows if kind == _KIND_STR)
        return [found.get(key) for key in keys]

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        return self.incr_many([(key, amount, ttl)])[0]

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """Several increments in one write transaction (rolled back if any fails)."""
        for _, _, ttl in items:
            _check_ttl(ttl)
        if not items:
            return []
        unique = list(dict.fromkeys(key for key, _, _ in items))
        marks = ",".join("?" * len(unique))
        with self._tx() as conn:
            now = self._clock()
            rows = conn.execute(
                f"SELECT key, kind, value, expires FROM kv WHERE key IN ({marks})",  # noqa: S608 - placeholders
                unique,
            ).fetchall()
            state: dict[str, tuple[int, float | None]] = {}
            stale_sets: list[tuple[str]] = []
            for key, kind, value, expires in rows:
                if expires is not None and expires <= now:
                    if kind == _KIND_SET:
                        stale_sets.append((key,))
                elif kind != _KIND_STR:
                    raise _wrong_type(key)
                else:
                    state[key] = (_parse_int(value, key), expires)
            out: list[int] = []
            for key, amount, ttl in items:
                current, expires = state.get(key, (0, None))
                result = _checked_sum(current, amount, key)
                if expires is None and ttl is not None:
                    expires = now + ttl
                state[key] = (result, expires)
                out.append(result)
            if stale_sets:
                conn.executemany("DELETE FROM members WHERE key = ?", stale_sets)
            conn.executemany(_UPSERT, [(key, _KIND_STR, str(v), e) for key, (v, e) in state.items()])
            return out

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds."""
        now = self._clock()
        rows = self._query(
            "SELECT expires FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)", (key, now)
        )
        if not rows or rows[0][0] is None:
            return None
        return float(rows[0][0]) - now

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key."""
        _check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            cur = conn.execute(
                "UPDATE kv SET expires = ? WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (now + ttl, key, now),
            )
            return cur.rowcount > 0

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        _check_ttl(ttl)
        if not members:
            return 0
        with self._tx() as conn:
            now = self._clock()
            row = self._live_row(conn, key, now)
            if row is not None and row[0] != _KIND_SET:
                raise _wrong_type(key)
            expires = None if row is None else row[2]
            if row is None:
                conn.execute("DELETE FROM members WHERE key = ?", (key,))
            if expires is None and ttl is not None:
                expires = now + ttl
            if row is None or expires != row[2]:
                conn.execute(_UPSERT, (key, _KIND_SET, None, expires))
            cur = conn.executemany(
                "INSERT OR IGNORE INTO members (key, member) VALUES (?, ?)",
                [(key, m) for m in members],
            )
            return cur.rowcount

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; an emptied set is deleted."""
        if not members:
            return 0
        with self._tx() as conn:
            row = self._live_row(conn, key, self._clock())
            if row is None:
                return 0
            if row[0] != _KIND_SET:
                raise _wrong_type(key)
            cur = conn.executemany(
                "DELETE FROM members WHERE key = ? AND member = ?", [(key, m) for m in members]
            )
            removed = cur.rowcount
            conn.execute(
                "DELETE FROM kv WHERE key = ? AND NOT EXISTS (SELECT 1 FROM members WHERE key = ?)",
                (key, key),
            )
            return removed

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set."""
        rows = self._query(
            "SELECT kv.kind, m.member FROM kv LEFT JOIN members AS m ON m.key = kv.key "
            "WHERE kv.key = ? AND (kv.expires IS NULL OR kv.expires > ?)",
            (key, self._clock()),
        )
        if rows and rows[0][0] != _KIND_SET:
            raise _wrong_type(key)
        return {member for _, member in rows if member is not None}

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        rows = self._query(
            "SELECT kind, EXISTS (SELECT 1 FROM members WHERE key = ?1 AND member = ?2) "
            "FROM kv WHERE key = ?1 AND (expires IS NULL OR expires > ?3)",
            (key, member, self._clock()),
        )
        if not rows:
            return False
        if rows[0][0] != _KIND_SET:
            raise _wrong_type(key)
        return bool(rows[0][1])

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix``, in code point order."""
        rows = self._query(
            "SELECT key FROM kv WHERE key >= ? AND (expires IS NULL OR expires > ?) "
            "ORDER BY key LIMIT ?",
            (prefix, self._clock(), _SCAN_BATCH),
        )
        while rows:
            for (key,) in rows:
                if not key.startswith(prefix):
                    return
                yield key
            rows = self._query(
                "SELECT key FROM kv WHERE key > ? AND (expires IS NULL OR expires > ?) "
                "ORDER BY key LIMIT ?",
                (rows[-1][0], self._clock(), _SCAN_BATCH),
            )

    def ping(self) -> None:
        """Check the database can be opened and read."""
        self._query("SELECT 1 FROM kv LIMIT 1", ())

    def close(self) -> None:
        """Close the pool (connections in use close when returned); later calls raise StoreUnavailable."""
        if self._pid != os.getpid():
            self._after_fork()
        with self._cond:
            self._closed = True
            self._stop_checkpoints.set()
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

_INCR_MANY_LUA = """
for i, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key).ok
    if kind ~= 'none' and kind ~= 'string' then
        return redis.error_reply('WRONGTYPE ' .. key)
    end
end
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('INCRBY', key, ARGV[2 * i - 1])
    local ttl = ARGV[2 * i]
    if ttl ~= '' and redis.call('PTTL', key) == -1 then
        redis.call('PEXPIRE', key, ttl)
    end
end
return out
"""

_SADD_LUA = """
local added = redis.call('SADD', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return added
"""

_SADD_CHUNK = 1000
_GLOB_SPECIAL_RE = re.compile(r"([*?\[\]\\])")


def _millis(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


class _NoScript(Exception):
    """The server does not know a script's digest yet (nothing was run)."""


class _Link(threading.local):
    conn: RedisConnection | None = None
    pid: int = 0


class RedisStore:
    """Store in Redis; every key is prefixed with ``key_prefix``.

    Each thread keeps its own connection (:mod:`mailwarden.resp`).  Commands are
    never retried (a retried increment could count twice): a connection the server
    closed while it was idle is replaced before a command is sent; a failure after
    sending raises StoreUnavailable.
    """

    def __init__(self, url: str, *, key_prefix: str = "mw:", socket_timeout: float = 1.0) -> None:
        self._url = _redact_url(url)
        self._prefix = key_prefix
        self._address = RedisAddress.from_url(url)
        self._timeout = socket_timeout
        self._link = _Link()
        self._links: weakref.WeakSet[RedisConnection] = weakref.WeakSet()
        self._links_lock = threading.Lock()
        self._scripts = {name: (text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())
                         for name, text in (("incr_many", _INCR_MANY_LUA), ("sadd", _SADD_LUA))}
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, key_prefix={self._prefix!r})"

    @property
    def key_prefix(self) -> str:
        """The prefix added to every key."""
        return self._prefix

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _connection(self, *, check_idle: bool = True) -> RedisConnection:
        link = self._link
        conn = link.conn
        pid = os.getpid()
        if conn is None or link.pid != pid:
            # A connection inherited across fork belongs to the parent: never reuse it.
            conn = RedisConnection(self._address, self._timeout)
            link.conn, link.pid = conn, pid
            with self._links_lock:
                self._links.add(conn)
        elif check_idle and conn.idle_closed():
            # Readable while idle: the server closed it (restart, timeout). Nothing was sent yet.
            conn.close()
        return conn

    def _command(self, key: str, *args: Any, read_only: bool = False) -> Any:
        """Send one command on this thread's connection and return its reply.

        Before a write, an idle connection is checked for having been closed by the
        server, so a write is never sent twice.  A read skips that check (one system
        call less) and is sent once more, on a new connection, when a reused one turns
        out to have been closed.
        """
        if self._closed:
            raise StoreUnavailable(f"redis store {self._url}: store is closed")
        try:
            conn = self._connection(check_idle=not read_only)
            if read_only and conn.connected:
                try:
                    return conn.command(*args)
                except RedisConnectionLost:
                    pass  # the retry below reconnects
            return conn.command(*args)
        except RedisReplyError as exc:
            if str(exc).startswith("NOSCRIPT"):
                raise _NoScript from exc
            raise self._map_response_error(key, exc) from exc
        except RedisError as exc:
            raise StoreUnavailable(f"redis store {self._url}: {exc}") from exc

    def _script(self, name: str, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        text, sha = self._scripts[name]
        try:
            return self._command(keys[0], "EVALSHA", sha, len(keys), *keys, *args)
        except _NoScript:
            self._command(keys[0], "SCRIPT", "LOAD", text)
            return self._command(keys[0], "EVALSHA", sha, len(keys), *keys, *args)

    def _map_response_error(self, key: str, exc: RedisReplyError) -> Exception:
        text = str(exc)
        if "WRONGTYPE" in text:
            return _wrong_type(key)
        if "not an integer" in text or "overflow" in text:
            return ValueError(f"cannot increment {key!r}: {text}")
        return StoreUnavailable(f"redis store {self._url}: {text}")

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        value = self._command(key, "GET", self._k(key), read_only=True)
        return None if value is None else str(value)

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys (one MGET), in order (None where absent)."""
        if not keys:
            return []
        values = self._command(keys[0], "MGET", *(self._k(k) for k in keys), read_only=True)
        return [None if v is None else str(v) for v in values]

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        _check_ttl(ttl)
        px = () if ttl is None else ("PX", _millis(ttl))
        self._command(key, "SET", self._k(key), value, *px)

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        _check_ttl(ttl)
        px = () if ttl is None else ("PX", _millis(ttl))
        return self._command(key, "SET", self._k(key), value, *px, "NX") is not None

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many live keys were removed."""
        if not keys:
            return 0
        return int(self._command(keys[0], "DEL", *(self._k(k) for k in keys)))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        return self.incr_many([(key, amount, ttl)])[0]

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """Several increments in one server-side script (types checked before any change)."""
        if not items:
            return []
        args: list[int | str] = []
        for _, amount, ttl in items:
            _check_ttl(ttl)
            args += [amount, "" if ttl is None else _millis(ttl)]
        try:
            values = self._script("incr_many", [self._k(k) for k, _, _ in items], args)
        except TypeError:
            bad = [k for k, _, _ in items if self._type(k) not in ("none", "string")]
            raise _wrong_type(bad[0] if bad else items[0][0]) from None
        return [int(v) for v in values]

    def _type(self, key: str) -> str:
        return str(self._command(key, "TYPE", self._k(key)))

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds."""
        millis = int(self._command(key, "PTTL", self._k(key), read_only=True))
        return None if millis < 0 else millis / 1000.0

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key."""
        _check_ttl(ttl)
        return bool(self._command(key, "PEXPIRE", self._k(key), _millis(ttl)))

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        _check_ttl(ttl)
        if not members:
            return 0
        if ttl is None:
            return int(self._command(key, "SADD", self._k(key), *members))
        px = _millis(ttl)
        added = 0
        for start in range(0, len(members), _SADD_CHUNK):
            added += int(self._script("sadd", [self._k(key)],
                                      [px, *members[start : start + _SADD_CHUNK]]))
        return added

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; an emptied set is deleted."""
        if not members:
            return 0
        return int(self._command(key, "SREM", self._k(key), *members))

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set."""
        return {str(m) for m in self._command(key, "SMEMBERS", self._k(key), read_only=True)}

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        return bool(self._command(key, "SISMEMBER", self._k(key), member, read_only=True))

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix`` (without the store's key prefix)."""
        pattern = _GLOB_SPECIAL_RE.sub(r"\\\1", self._k(prefix)) + "*"
        strip = len(self._prefix)
        seen: builtins.set[str] = set()
        cursor = "0"
        while True:
            cursor, keys = self._command(prefix, "SCAN", cursor, "MATCH", pattern, "COUNT", 500,
                                         read_only=True)
            for full in map(str, keys):
                if full not in seen:
                    seen.add(full)
                    yield full[strip:]
            if str(cursor) == "0":
                return

    def ping(self) -> None:
        """Check the server answers."""
        self._command("", "PING", read_only=True)

    def close(self) -> None:
        """Close every thread's connection; later calls raise StoreUnavailable."""
        self._closed = True
        with self._links_lock:
            links = list(self._links)
        for conn in links:
            conn.close()


def open_store(
    backend: str,
    *,
    sqlite_path: str,
    redis_url: str,
    key_prefix: str = "mw:",
    timeout: float = 1.0,
) -> Store:
    """Open the configured backend: ``"sqlite"``, ``"redis"`` or ``"memory"``.

    ``timeout`` is the Redis socket timeout or the SQLite busy timeout, in seconds.
    """
    if backend == "sqlite":
        return SQLiteStore(sqlite_path, busy_timeout=timeout)
    if backend == "redis":
        return RedisStore(redis_url, key_prefix=key_prefix, socket_timeout=timeout)
    if backend == "memory":
        return MemoryStore()
    raise ValueError(f"unknown store backend {backend!r} (expected sqlite, redis or memory)")
