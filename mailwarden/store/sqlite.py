"""The single-node store: one SQLite file in WAL mode, shared by a node's threads and processes."""

from __future__ import annotations

import builtins
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")
_log = logging.getLogger("mailwarden.store")

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
            raise wrong_type(key)
        return str(value)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            conn.execute("DELETE FROM members WHERE key = ?", (key,))
            conn.execute(_UPSERT, (key, _KIND_STR, value, None if ttl is None else now + ttl))

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        check_ttl(ttl)
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
            check_ttl(ttl)
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
                    raise wrong_type(key)
                else:
                    state[key] = (parse_int(value, key), expires)
            out: list[int] = []
            for key, amount, ttl in items:
                current, expires = state.get(key, (0, None))
                result = checked_sum(current, amount, key)
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
        check_ttl(ttl)
        with self._tx() as conn:
            now = self._clock()
            cur = conn.execute(
                "UPDATE kv SET expires = ? WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (now + ttl, key, now),
            )
            return cur.rowcount > 0

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        check_ttl(ttl)
        if not members:
            return 0
        with self._tx() as conn:
            now = self._clock()
            row = self._live_row(conn, key, now)
            if row is not None and row[0] != _KIND_SET:
                raise wrong_type(key)
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
                raise wrong_type(key)
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
            raise wrong_type(key)
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
            raise wrong_type(key)
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

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """See :meth:`Store.call_many <mailwarden.store.base.Store.call_many>` (one after the other)."""
        return call_each(self, calls)

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
