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
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreUnavailable",
    "open_store",
]

_T = TypeVar("_T")

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INTEGER_RE = re.compile(r"-?[0-9]{1,20}")


class StoreUnavailable(Exception):
    """The state backend cannot be reached or failed; treat as a temporary failure."""


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

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        _check_ttl(ttl)
        with self._lock:
            now = self._now()
            entry = self._live(key, now)
            if entry is None:
                entry = _Entry("0", None)
                current = 0
            elif isinstance(entry.value, set):
                raise _wrong_type(key)
            else:
                current = _parse_int(entry.value, key)
            result = _checked_sum(current, amount, key)
            entry.value = str(result)
            if entry.expires is None and ttl is not None:
                entry.expires = now + ttl
            self._data[key] = entry
            return result

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
_PURGE_EVERY = 100
_PURGE_LIMIT = 200

# Connections inherited from a parent process must never be used or closed in the
# child (SQLite forbids carrying connections across fork); they are parked here.
_FORK_ORPHANS: list[sqlite3.Connection] = []


class _ThreadState(threading.local):
    conn: sqlite3.Connection | None = None
    pid: int = 0
    writes: int = 0


class SQLiteStore:
    """Store in one SQLite file (WAL mode), shared by the threads and processes of a node.

    Each thread uses its own connection. Read-modify-write operations run inside
    ``BEGIN IMMEDIATE`` so that concurrent processes serialise on the write lock;
    a lock held longer than ``busy_timeout`` raises StoreUnavailable. Expired rows
    are ignored by every query and purged a few at a time during writes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._local = _ThreadState()
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._conn()

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
        except (OSError, sqlite3.Error) as exc:
            conn.close()
            raise self._unavailable(exc) from exc
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self._path}: store is closed")
        state = self._local
        pid = os.getpid()
        if state.conn is None or state.pid != pid:
            if state.pid != pid:
                with self._conns_lock:
                    _FORK_ORPHANS.extend(c for p, c in self._conns if p != pid)
                    self._conns = [(p, c) for p, c in self._conns if p == pid]
            conn = self._connect()
            with self._conns_lock:
                self._conns.append((pid, conn))
            state.conn, state.pid, state.writes = conn, pid, 0
        return state.conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Run the body in a write transaction; sqlite errors become StoreUnavailable."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            yield conn
            state = self._local
            state.writes += 1
            if state.writes % _PURGE_EVERY == 0:
                self._purge(conn, _PURGE_LIMIT)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable(exc) from exc
            raise

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._conn()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

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

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        _check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            row = self._live_row(conn, key, now)
            if row is None:
                conn.execute("DELETE FROM members WHERE key = ?", (key,))
                current, expires = 0, None
            elif row[0] != _KIND_STR:
                raise _wrong_type(key)
            else:
                current, expires = _parse_int(row[1], key), row[2]
            result = _checked_sum(current, amount, key)
            if expires is None and ttl is not None:
                expires = now + ttl
            conn.execute(_UPSERT, (key, _KIND_STR, str(result), expires))
            return result

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
        """Close this process's connections; later calls raise StoreUnavailable."""
        self._closed = True
        pid = os.getpid()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for owner, conn in conns:
            if owner == pid:
                conn.close()
            else:
                _FORK_ORPHANS.append(conn)


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

_INCR_LUA = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
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


class RedisStore:
    """Store in Redis; every key is prefixed with ``key_prefix``.

    Commands are not retried (a retried increment could count twice); a stale
    pooled connection is replaced transparently by redis-py before use.
    """

    def __init__(self, url: str, *, key_prefix: str = "mw:", socket_timeout: float = 1.0) -> None:
        self._url = _redact_url(url)
        self._prefix = key_prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._incr_script = self._client.register_script(_INCR_LUA)
        self._sadd_script = self._client.register_script(_SADD_LUA)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self._url!r}, key_prefix={self._prefix!r})"

    @property
    def key_prefix(self) -> str:
        """The prefix added to every key."""
        return self._prefix

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _call(self, key: str, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise StoreUnavailable(f"redis store {self._url}: store is closed")
        try:
            return fn()
        except redis.ResponseError as exc:
            raise self._map_response_error(key, exc) from exc
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis store {self._url}: {exc}") from exc

    def _map_response_error(self, key: str, exc: redis.ResponseError) -> Exception:
        text = str(exc)
        if "WRONGTYPE" in text:
            return _wrong_type(key)
        if "not an integer" in text or "overflow" in text:
            return ValueError(f"cannot increment {key!r}: {text}")
        return StoreUnavailable(f"redis store {self._url}: {text}")

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        value = self._call(key, lambda: self._client.get(self._k(key)))
        return None if value is None else str(value)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        _check_ttl(ttl)
        px = None if ttl is None else _millis(ttl)
        self._call(key, lambda: self._client.set(self._k(key), value, px=px))

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        _check_ttl(ttl)
        px = None if ttl is None else _millis(ttl)
        return bool(self._call(key, lambda: self._client.set(self._k(key), value, px=px, nx=True)))

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many live keys were removed."""
        if not keys:
            return 0
        full = [self._k(k) for k in keys]
        return int(self._call(keys[0], lambda: self._client.delete(*full)))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        _check_ttl(ttl)
        args: list[int | str] = [amount, "" if ttl is None else _millis(ttl)]
        return int(self._call(key, lambda: self._incr_script(keys=[self._k(key)], args=args)))

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds."""
        millis = int(self._call(key, lambda: self._client.pttl(self._k(key))))
        return None if millis < 0 else millis / 1000.0

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key."""
        _check_ttl(ttl)
        return bool(self._call(key, lambda: self._client.pexpire(self._k(key), _millis(ttl))))

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        _check_ttl(ttl)
        if not members:
            return 0
        if ttl is None:
            return int(self._call(key, lambda: self._client.sadd(self._k(key), *members)))
        px = _millis(ttl)
        added = 0
        for start in range(0, len(members), _SADD_CHUNK):
            args: list[int | str] = [px, *members[start : start + _SADD_CHUNK]]
            added += int(
                self._call(key, partial(self._sadd_script, keys=[self._k(key)], args=args))
            )
        return added

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; an emptied set is deleted."""
        if not members:
            return 0
        return int(self._call(key, lambda: self._client.srem(self._k(key), *members)))

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set."""
        members = self._call(key, lambda: self._client.smembers(self._k(key)))
        return {str(m) for m in members}

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        return bool(self._call(key, lambda: self._client.sismember(self._k(key), member)))

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix`` (without the store's key prefix)."""
        pattern = _GLOB_SPECIAL_RE.sub(r"\\\1", self._k(prefix)) + "*"
        strip = len(self._prefix)
        seen: builtins.set[str] = set()
        cursor = 0
        while True:
            reply = self._call(
                prefix, partial(self._client.scan, cursor=cursor, match=pattern, count=500)
            )
            cursor = int(reply[0])
            for full in map(str, reply[1]):
                if full not in seen:
                    seen.add(full)
                    yield full[strip:]
            if cursor == 0:
                return

    def ping(self) -> None:
        """Check the server answers."""
        self._call("", self._client.ping)

    def close(self) -> None:
        """Close the connection pool; later calls raise StoreUnavailable."""
        self._closed = True
        self._client.close()


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
