"""The cluster store in Redis, over redis-py (with hiredis): :class:`RedisStore` for
threads, :class:`AsyncRedisStore` for an asyncio event loop.

Both keep the :class:`~mailwarden.store.base.Store` semantics exactly, in the same way:

* Every key carries ``key_prefix``.
* ``incr_many`` (and so ``incr``) and ``sadd`` with a ttl run as Lua scripts
  (``register_script``: EVALSHA, and SCRIPT LOAD once when the server does not know
  the script yet), so an existing expiry is never extended and a type or value error
  in any item leaves every counter unchanged.
* **Retries.** The connections are made without redis-py's retries
  (``Retry(NoBackoff(), 0)``), so a write (SET, DEL, a script...) is sent once: a
  counter is never counted twice. A read (GET, MGET, PTTL, SMEMBERS, SISMEMBER, SCAN,
  PING) that fails with a ``ConnectionError`` (the connection dropped) is sent once
  more, on a new connection (the asyncio store: redis-py's ``Retry(NoBackoff(), 1)``
  limited to ConnectionError); a read that timed out is not sent again. Before any
  command the pool replaces an idle connection the server has closed (redis-py checks
  that it is not readable; on the event loop, once the loop has seen the close), so a
  Redis restart between commands is not an error.
* **Connections.** The blocking store keeps one pool connection per thread (see
  :meth:`RedisStore._connection`) and sends commands on it with redis-py's
  ``Connection.send_command`` / ``read_response``; the asyncio store borrows one from
  its pool per command.
* **Errors.** Wrong type: ``TypeError``. Not an integer, or an overflow:
  ``ValueError``. Anything else redis-py raises (refused, reset, timed out, AUTH,
  LOADING, READONLY...): :class:`StoreUnavailable`, with the URL (password masked).

**Sentinel.** :meth:`RedisStore.from_sentinel` (and the asyncio one) follow the
primary that Redis Sentinel names: each new connection asks the Sentinels for its
address, and redis-py drops a connection whose server answers READONLY (a demoted
primary). The same retry rule then covers a failover. A read that failed because the
old primary went away is sent once more, on a new connection to the primary the
Sentinels name now. A write that may have reached the old primary is not sent again,
because the old primary may have applied it and passed it to the replica that is now
primary before it died. The caller gets StoreUnavailable (a temporary failure) and
decides for itself. Redis replicates asynchronously, so the failover can still lose a
write that was acknowledged just before the primary died. A counter can then come out
one short, but never one too many.

One ``ConnectionPool`` per store: the blocking one is thread-safe and fork-safe (a
forked child opens its own connections); the asyncio one belongs to one event loop.
:func:`pool_options` are the options of both, so a store over a pool made elsewhere
(:meth:`RedisStore.from_client`, e.g. ``Sentinel(...).master_for(name,
**pool_options(timeout))``) behaves the same.
"""

from __future__ import annotations

import builtins
import math
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailwarden.store.base import Increment, StoreCall, StoreUnavailable, call_each, check_ttl, wrong_type

__all__ = [
    "AsyncRedisStore",
    "RedisStore",
    "SentinelSettings",
    "parse_sentinel",
    "pool_options",
    "redact_url",
]

INCR_MANY_LUA = """
-- KEYS: the counters; ARGV: per counter its amount and its ttl in ms ('' for none).
-- Nothing changes unless every increment can be made: the types are checked first, and
-- an increment Redis refuses (not an integer, overflow) undoes those made before it.
for i, key in ipairs(KEYS) do
    local kind = redis.call('TYPE', key).ok
    if kind ~= 'none' and kind ~= 'string' then
        return redis.error_reply('WRONGTYPE ' .. i)
    end
end
local out, before = {}, {}
for i, key in ipairs(KEYS) do
    if not before[key] then
        before[key] = {redis.call('GET', key), redis.call('PTTL', key)}
    end
    local value = redis.pcall('INCRBY', key, ARGV[2 * i - 1])
    if type(value) == 'table' and value.err then
        for k, old in pairs(before) do
            if old[1] then
                redis.call('SET', k, old[1])
                if old[2] > 0 then
                    redis.call('PEXPIRE', k, old[2])
                end
            else
                redis.call('DEL', k)
            end
        end
        return redis.error_reply('NOTINT ' .. i .. ' ' .. value.err)
    end
    out[i] = value
    local ttl = ARGV[2 * i]
    if ttl ~= '' and redis.call('PTTL', key) == -1 then
        redis.call('PEXPIRE', key, ttl)
    end
end
return out
"""

SADD_LUA = """
local added = redis.call('SADD', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return added
"""

_SADD_CHUNK = 1000
_SCAN_COUNT = 500
_GLOB_SPECIAL_RE = re.compile(r"([*?\[\]\\])")


def pool_options(socket_timeout: float, *, asyncio: bool = False) -> dict[str, Any]:
    """The connection options of every store pool (``from_url`` or Sentinel's ``master_for``).

    RESP2 (the replies the scripts are written for; no HELLO round trip on connect).
    Replies are decoded as UTF-8 (bytes that are not become U+FFFD), ``socket_timeout``
    bounds connecting and every reply, and redis-py retries nothing (see the module).
    """
    retry = AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0)
    return {"protocol": 2, "decode_responses": True, "encoding_errors": "replace",
            "socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout, "retry": retry}


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part or the query) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        masked = [(name, "***" if name == "password" else value) for name, value in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis url {redact_url(url)!r}: expected redis://, rediss:// or unix://")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"redis url {redact_url(url)!r}: no socket path")
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        # redis-py would quietly use database 0.
        raise ValueError(f"redis url {redact_url(url)!r}: database {database!r} is not a number")


def parse_sentinel(entry: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of one Sentinel; ValueError when it is none."""
    host, sep, port = entry.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sentinel {entry!r}: expected host:port")
    return host, int(port)


@dataclass(frozen=True)
class SentinelSettings:
    """Where the store asks for the current primary: Redis Sentinel.

    ``sentinels`` are ``host:port`` entries, asked in turn; ``service`` is the primary's
    name there (``sentinel monitor NAME ...``); ``password`` is the Sentinels' own (empty:
    none). The store's URL (``redis://[[user]:password@]host[:port]/db``) then gives only
    the primary's username, password and database: its host and port are the Sentinels'
    answer.
    """

    sentinels: tuple[str, ...]
    service: str = "mymaster"
    password: str = ""

    def addresses(self) -> list[tuple[str, int]]:
        """The Sentinels as (host, port); ValueError for an entry that is not host:port."""
        if not self.sentinels:
            raise ValueError("no sentinels")
        return [parse_sentinel(entry) for entry in self.sentinels]

    def name(self) -> str:
        """How errors name the store: the service and its Sentinels (no password)."""
        return f"sentinel {self.service} via {','.join(self.sentinels)}"

    def primary_options(self, url: str) -> dict[str, Any]:
        """The primary's credentials and database from ``url`` (a ``redis://`` URL)."""
        _check_url(url)
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"redis url {redact_url(url)!r}: with sentinels only redis:// is supported")
        database = parts.path.strip("/")
        return {"db": int(database or 0), "username": parts.username or None,
                "password": parts.password or None}

    def sentinel_options(self, socket_timeout: float, *, asyncio: bool = False) -> dict[str, Any]:
        """The options of the connections to the Sentinels (each asked once per lookup)."""
        retry = AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0)
        return {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
                "retry": retry, "password": self.password or None}


def _millis(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


class _RedisCommands:
    """What the blocking and the asyncio store share: keys, arguments, replies, errors."""

    def __init__(self, name: str, key_prefix: str) -> None:
        self._name = name
        self._prefix = key_prefix
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, key_prefix={self._prefix!r})"

    @property
    def key_prefix(self) -> str:
        """The prefix added to every key."""
        return self._prefix

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _unavailable(self, detail: object) -> StoreUnavailable:
        return StoreUnavailable(f"redis store {self._name}: {detail}")

    def _check_open(self) -> None:
        if self._closed:
            raise self._unavailable("store is closed")

    def _error(self, exc: redis.RedisError, key: str, items: Sequence[Increment] = ()) -> Exception:
        """The Store error for what redis-py raised about ``key`` (or one of ``items``)."""
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, redis.ResponseError):
            return self._unavailable(text)
        code, _, rest = text.partition(" ")
        if items and code in ("WRONGTYPE", "NOTINT"):
            # From the incr_many script: the item's number, then Redis's own message.
            number, _, detail = rest.partition(" ")
            if number.isdigit() and 0 < int(number) <= len(items):
                key = items[int(number) - 1][0]
            if code == "WRONGTYPE":
                return wrong_type(key)
            return ValueError(f"cannot increment {key!r}: {detail}")
        if "WRONGTYPE" in text:
            return wrong_type(key)
        if "not an integer" in text or "overflow" in text:
            return ValueError(f"cannot increment {key!r}: {text}")
        return self._unavailable(text)

    def _set_args(self, key: str, value: str, ttl: float | None, *, only_new: bool) -> tuple[Any, ...]:
        check_ttl(ttl)
        px = () if ttl is None else ("PX", _millis(ttl))
        return ("SET", self._k(key), value, *px, *(("NX",) if only_new else ()))

    def _incr_many_args(self, items: Sequence[Increment]) -> tuple[list[str], list[int | str]]:
        argv: list[int | str] = []
        for _, amount, ttl in items:
            check_ttl(ttl)
            argv += [amount, "" if ttl is None else _millis(ttl)]
        return [self._k(key) for key, _, _ in items], argv

    def _scan_pattern(self, prefix: str) -> str:
        return _GLOB_SPECIAL_RE.sub(r"\\\1", self._k(prefix)) + "*"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _seconds(millis: Any) -> float | None:
    return None if int(millis) < 0 else int(millis) / 1000.0


def _texts(values: Any) -> list[str | None]:
    return [_text(v) for v in values]


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


@dataclass(frozen=True, slots=True)
class _Pipelined:
    """One command of :meth:`RedisStore.call_many`'s pipeline and how to read its reply."""

    key: str
    args: tuple[Any, ...]
    convert: Callable[[Any], Any]
    read: bool
    items: Sequence[Increment] = ()


_forks = [0]
"""How many forks made this process (counted in the child): a connection taken before
a fork belongs to the parent. Compared on every command, which getpid() would make a
system call."""
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class _Held:
    """A pool connection kept by one thread; given back to the pool when the thread ends
    (its thread-local storage is dropped), unless the process forked since."""

    __slots__ = ("__weakref__", "connection", "forks")

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.forks = _forks[0]
        self.connection = pool.get_connection()
        weakref.finalize(self, _give_back, pool, self.connection, self.forks)


def _give_back(pool: redis.ConnectionPool, connection: Any, forks: int) -> None:
    if forks == _forks[0]:
        pool.release(connection)


def _packed(connection: Any, args: Sequence[Any]) -> list[bytes]:
    """The command in RESP, packed by hiredis directly (the packer redis-py itself calls).

    Measured reason: redis-py's ``pack_command`` encodes each argument in a Python
    generator first, about 3 µs per command against 0.3 µs. Anything hiredis will not
    pack as redis-py would (text with lone surrogates, which redis-py's encoder replaces;
    other types) goes through redis-py's packer.
    """
    try:
        return [hiredis.pack_command(tuple(args))]
    except (TypeError, UnicodeError):
        packed: list[bytes] = connection.pack_command(*args)
        return packed


class RedisStore(_RedisCommands):
    """Store in Redis, for threads: one redis-py client over one ``ConnectionPool``.

    ``url`` is anything redis-py's ``from_url`` reads: ``redis://[[user]:password@]host
    [:port][/db]``, ``rediss://...`` (TLS, system trust store), ``unix:///path.sock
    [?db=N&password=...]``. A URL that is none raises ValueError. Nothing connects
    before the first command. See the module for retries and errors.
    """

    def __init__(self, url: str, *, key_prefix: str = "mw:", socket_timeout: float = 1.0) -> None:
        _check_url(url)
        try:
            pool = redis.ConnectionPool.from_url(url, **pool_options(socket_timeout))
        except ValueError as exc:
            raise ValueError(f"redis url {redact_url(url)!r}: {exc}") from None
        self._setup(redis.Redis(connection_pool=pool), redact_url(url), key_prefix)

    @classmethod
    def from_client(cls, client: redis.Redis, *, name: str, key_prefix: str = "mw:") -> RedisStore:
        """A store over a client made elsewhere (Sentinel's ``master_for``, say), whose pool
        was made with :func:`pool_options`; ``name`` (no password) names it in errors."""
        store = cls.__new__(cls)
        store._setup(client, name, key_prefix)
        return store

    @classmethod
    def from_sentinel(cls, settings: SentinelSettings, url: str, *, key_prefix: str = "mw:",
                      socket_timeout: float = 1.0) -> RedisStore:
        """A store on the primary the Sentinels name now, and on the next one after a failover.

        Each new connection asks the Sentinels for the primary's address; a connection
        to a demoted primary (READONLY) is dropped. Retries as in the module: a write
        is sent once, so one that may have reached the old primary is never sent again.
        """
        sentinel = redis.sentinel.Sentinel(
            settings.addresses(), sentinel_kwargs=settings.sentinel_options(socket_timeout))
        client = sentinel.master_for(settings.service, redis_class=redis.Redis,
                                     **pool_options(socket_timeout), **settings.primary_options(url))
        return cls.from_client(client, name=settings.name(), key_prefix=key_prefix)

    def _setup(self, client: redis.Redis, name: str, key_prefix: str) -> None:
        _RedisCommands.__init__(self, name, key_prefix)
        self._client = client
        self._pool = client.connection_pool
        self._held = threading.local()
        self._incr_many_script = client.register_script(INCR_MANY_LUA)
        self._sadd_script = client.register_script(SADD_LUA)

    def _connection(self) -> Any:
        """The calling thread's connection, checked by the pool before every command.

        Taken from the pool on a thread's first command and kept while the thread lives
        (given back when it ends); a forked child takes its own. The pool's
        ``ensure_connection`` replaces one the server has closed, as ``get_connection``
        does. Measured reason: borrowing and returning a connection and redis-py's
        client layer (retry object, observability hooks, response callbacks) cost about
        10-15 µs of CPU per command, a tenth of a policy request; the commands
        themselves still go through redis-py's connection and parser.
        """
        held: _Held | None = getattr(self._held, "conn", None)
        if held is None or held.forks != _forks[0]:
            held = _Held(self._pool)
            self._held.conn = held
        else:
            self._pool.ensure_connection(held.connection)
        return held.connection

    def _send(self, args: Sequence[Any]) -> Any:
        """One command and its reply on this thread's connection (dropped on any fault but
        an error reply, like redis-py's client does)."""
        connection = self._connection()
        try:
            connection.send_packed_command(_packed(connection, args))
            return connection.read_response()
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise

    def _command(self, key: str, *args: Any, read: bool = False) -> Any:
        """Send one command (a read: once more after a dropped connection) and return its reply."""
        self._check_open()
        try:
            if read:
                try:
                    return self._send(args)
                except redis.ConnectionError:
                    # Dropped or refused: sent once more, on a new connection.
                    return self._send(args)
            return self._send(args)
        except redis.RedisError as exc:
            raise self._error(exc, key) from exc

    def _script(self, script: Any, key: str, keys: list[str], argv: list[int | str],
                items: Sequence[Increment] = ()) -> Any:
        """EVALSHA; after NOSCRIPT (the script did not run) SCRIPT LOAD and EVALSHA once more,
        as redis-py's ``Script`` does."""
        self._check_open()
        command = ("EVALSHA", script.sha, len(keys), *keys, *argv)
        try:
            try:
                return self._send(command)
            except redis.exceptions.NoScriptError:
                self._send(("SCRIPT", "LOAD", script.script))
                return self._send(command)
        except redis.RedisError as exc:
            raise self._error(exc, key, items) from exc

    def _pipelined(self, call: StoreCall) -> _Pipelined | None:
        """``call`` as one command to pipeline, or None to make it on its own.

        Only the operations on a policy request's path are pipelined: GET, MGET and the
        counters' script.
        """
        if call.kwargs:
            return None
        if call.name == "get" and len(call.args) == 1:
            key = call.args[0]
            return _Pipelined(key, ("GET", self._k(key)), _text, read=True)
        if call.name == "get_many" and len(call.args) == 1 and call.args[0]:
            keys = call.args[0]
            return _Pipelined(keys[0], ("MGET", *(self._k(k) for k in keys)), _texts, read=True)
        if call.name == "incr_many" and len(call.args) == 1 and call.args[0]:
            items = call.args[0]
            keys, argv = self._incr_many_args(items)
            return _Pipelined(items[0][0], ("EVALSHA", self._incr_many_script.sha, len(keys), *keys, *argv),
                              _ints, read=False, items=items)
        return None

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """Several operations; GET, MGET and ``incr_many`` are pipelined: sent together on this
        thread's connection and their replies read in order, in one round trip.

        The module's retry rule holds for each: when the connection fails, a read whose
        reply was not read is sent once more, alone, on a new connection; a write is not
        sent again and answers StoreUnavailable. ``incr_many`` after NOSCRIPT (the script
        did not run) is made once more as :meth:`incr_many` after the pipeline, once the
        script is loaded. The others are made one after
        the other. Measured reason: a policy daemon's event loop that sends each request's
        command alone waits one round trip per request; an MGET in a pipeline of 8 costs
        the client about a third of the CPU of one sent alone (docs/policyd.md).
        """
        results: list[Any] = [None] * len(calls)
        batch: list[tuple[int, _Pipelined]] = []
        for i, call in enumerate(calls):
            try:
                planned = self._pipelined(call)
            except ValueError as exc:
                results[i] = exc
                continue
            if planned is None:
                if batch:  # in order: what is pipelined so far goes first
                    self._send_batch(batch, calls, results)
                    batch = []
                results[i] = call_each(self, [call])[0]
            else:
                batch.append((i, planned))
        if batch:
            self._send_batch(batch, calls, results)
        return results

    def _send_batch(self, batch: list[tuple[int, _Pipelined]], calls: Sequence[StoreCall],
                    results: list[Any]) -> None:
        """Send the batch in one write, read the replies in order (see :meth:`call_many`)."""
        try:
            self._check_open()
            connection = self._connection()
        except (StoreUnavailable, redis.RedisError) as exc:
            failed = exc if isinstance(exc, StoreUnavailable) else self._unavailable(exc)
            for i, _ in batch:
                results[i] = failed
            return
        read = 0
        unknown_script: list[int] = []
        try:
            connection.send_packed_command([chunk for _, planned in batch
                                            for chunk in _packed(connection, planned.args)])
            for i, planned in batch:
                try:
                    results[i] = planned.convert(connection.read_response())
                except redis.exceptions.NoScriptError:
                    unknown_script.append(i)
                except redis.ResponseError as exc:
                    results[i] = self._error(exc, planned.key, planned.items)
                read += 1
        except BaseException as exc:
            connection.disconnect()
            if not isinstance(exc, redis.RedisError):
                raise
            for i, planned in batch[read:]:
                if planned.read and isinstance(exc, redis.ConnectionError):
                    # Dropped or refused: sent once more, alone, on a new connection.
                    try:
                        results[i] = planned.convert(self._send(planned.args))
                    except redis.RedisError as again:
                        results[i] = self._error(again, planned.key)
                else:
                    results[i] = self._error(exc, planned.key)
        if unknown_script:  # once every reply of the pipeline is read
            try:
                self._send(("SCRIPT", "LOAD", self._incr_many_script.script))
            except redis.RedisError as exc:
                for i in unknown_script:
                    results[i] = self._error(exc, batch[0][1].key)
                return
            for i in unknown_script:
                results[i] = call_each(self, [calls[i]])[0]

    def get(self, key: str) -> str | None:
        """Return the value of ``key``, or None if absent or expired."""
        return _text(self._command(key, "GET", self._k(key), read=True))

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys (one MGET), in order (None where absent)."""
        if not keys:
            return []
        values = self._command(keys[0], "MGET", *(self._k(k) for k in keys), read=True)
        return [_text(v) for v in values]

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing anything there."""
        self._command(key, *self._set_args(key, value, ttl, only_new=False))

    def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired."""
        return bool(self._command(key, *self._set_args(key, value, ttl, only_new=True)))

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many live keys were removed."""
        if not keys:
            return 0
        return int(self._command(keys[0], "DEL", *(self._k(k) for k in keys)))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomically add ``amount``; ttl only applied when the key has no expiry."""
        return self.incr_many([(key, amount, ttl)])[0]

    def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """Several increments in one server-side script (nothing changes if one fails)."""
        if not items:
            return []
        keys, argv = self._incr_many_args(items)
        return [int(v) for v in self._script(self._incr_many_script, items[0][0], keys, argv, items)]

    def ttl(self, key: str) -> float | None:
        """Remaining lifetime of ``key`` in seconds."""
        return _seconds(self._command(key, "PTTL", self._k(key), read=True))

    def expire(self, key: str, ttl: float) -> bool:
        """Set the expiry of an existing key."""
        check_ttl(ttl)
        return bool(self._command(key, "PEXPIRE", self._k(key), _millis(ttl)))

    def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """Add members to a set; ttl only applied when the set has no expiry."""
        check_ttl(ttl)
        if not members:
            return 0
        if ttl is None:
            return int(self._command(key, "SADD", self._k(key), *members))
        added = 0
        for start in range(0, len(members), _SADD_CHUNK):
            chunk = list(members[start : start + _SADD_CHUNK])
            added += int(self._script(self._sadd_script, key, [self._k(key)], [_millis(ttl), *chunk]))
        return added

    def srem(self, key: str, *members: str) -> int:
        """Remove members from a set; an emptied set is deleted."""
        if not members:
            return 0
        return int(self._command(key, "SREM", self._k(key), *members))

    def smembers(self, key: str) -> builtins.set[str]:
        """Return all members of a set."""
        return {str(m) for m in self._command(key, "SMEMBERS", self._k(key), read=True)}

    def sismember(self, key: str, member: str) -> bool:
        """Return whether ``member`` is in the set ``key``."""
        return bool(self._command(key, "SISMEMBER", self._k(key), member, read=True))

    def scan(self, prefix: str = "") -> Iterator[str]:
        """Yield live keys starting with ``prefix`` (without the store's key prefix)."""
        pattern = self._scan_pattern(prefix)
        strip = len(self._prefix)
        seen: builtins.set[str] = set()
        cursor: Any = 0
        while True:
            cursor, keys = self._command(prefix, "SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT,
                                         read=True)
            for full in map(str, keys):
                if full not in seen:
                    seen.add(full)
                    yield full[strip:]
            if int(cursor) == 0:
                return

    def ping(self) -> None:
        """Check the server answers."""
        self._command("", "PING", read=True)

    def close(self) -> None:
        """Close the pool's connections (also those in use); later calls raise StoreUnavailable."""
        self._closed = True
        self._client.connection_pool.disconnect()


class AsyncRedisStore(_RedisCommands):
    """:class:`~mailwarden.store.base.AsyncStore` in Redis: ``redis.asyncio`` (hiredis) over one
    ``ConnectionPool`` on the running event loop; concurrent calls use their own connections.

    The same URLs, semantics, retries and errors as :class:`RedisStore`; a Redis that is
    down or stopped answers StoreUnavailable within ``socket_timeout``. Use it on one
    event loop, and ``await close()`` on that loop.
    """

    def __init__(self, url: str, *, key_prefix: str = "mw:", socket_timeout: float = 1.0) -> None:
        _check_url(url)
        try:
            pool = redis.asyncio.ConnectionPool.from_url(url, **pool_options(socket_timeout, asyncio=True))
        except ValueError as exc:
            raise ValueError(f"redis url {redact_url(url)!r}: {exc}") from None
        self._setup(redis.asyncio.Redis(connection_pool=pool), redact_url(url), key_prefix)

    @classmethod
    def from_client(
        cls, client: redis.asyncio.Redis, *, name: str, key_prefix: str = "mw:"
    ) -> AsyncRedisStore:
        """As :meth:`RedisStore.from_client`, for an asyncio client."""
        store = cls.__new__(cls)
        store._setup(client, name, key_prefix)
        return store

    @classmethod
    def from_sentinel(cls, settings: SentinelSettings, url: str, *, key_prefix: str = "mw:",
                      socket_timeout: float = 1.0) -> AsyncRedisStore:
        """As :meth:`RedisStore.from_sentinel`, on the running event loop."""
        sentinel = redis.asyncio.sentinel.Sentinel(
            settings.addresses(), sentinel_kwargs=settings.sentinel_options(socket_timeout, asyncio=True))
        client = sentinel.master_for(settings.service, redis_class=redis.asyncio.Redis,
                                     **pool_options(socket_timeout, asyncio=True),
                                     **settings.primary_options(url))
        return cls.from_client(client, name=settings.name(), key_prefix=key_prefix)

    def _setup(self, client: redis.asyncio.Redis, name: str, key_prefix: str) -> None:
        _RedisCommands.__init__(self, name, key_prefix)
        self._client = client
        self._read_retry = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        self._incr_many_script = client.register_script(INCR_MANY_LUA)
        self._sadd_script = client.register_script(SADD_LUA)

    async def _command(self, key: str, *args: Any, read: bool = False) -> Any:
        """Send one command (a read: once more after a dropped connection) and return its reply."""
        self._check_open()
        execute: Callable[..., Any] = self._client.execute_command  # redis-py leaves it untyped
        try:
            if read:
                return await self._read_retry.call_with_retry(lambda: execute(*args), _async_ignore)
            return await execute(*args)
        except redis.RedisError as exc:
            raise self._error(exc, key) from exc

    async def _script(self, script: Any, key: str, keys: list[str], argv: list[int | str],
                      items: Sequence[Increment] = ()) -> Any:
        self._check_open()
        try:
            return await script(keys=keys, args=argv)
        except redis.RedisError as exc:
            raise self._error(exc, key, items) from exc

    async def get(self, key: str) -> str | None:
        """See :meth:`RedisStore.get`."""
        return _text(await self._command(key, "GET", self._k(key), read=True))

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """See :meth:`RedisStore.get_many`."""
        if not keys:
            return []
        values = await self._command(keys[0], "MGET", *(self._k(k) for k in keys), read=True)
        return [_text(v) for v in values]

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        """See :meth:`RedisStore.set`."""
        await self._command(key, *self._set_args(key, value, ttl, only_new=False))

    async def add(self, key: str, value: str, ttl: float | None = None) -> bool:
        """See :meth:`RedisStore.add`."""
        return bool(await self._command(key, *self._set_args(key, value, ttl, only_new=True)))

    async def delete(self, *keys: str) -> int:
        """See :meth:`RedisStore.delete`."""
        if not keys:
            return 0
        return int(await self._command(keys[0], "DEL", *(self._k(k) for k in keys)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """See :meth:`RedisStore.incr`."""
        return (await self.incr_many([(key, amount, ttl)]))[0]

    async def incr_many(self, items: Sequence[Increment]) -> list[int]:
        """See :meth:`RedisStore.incr_many`."""
        if not items:
            return []
        keys, argv = self._incr_many_args(items)
        values = await self._script(self._incr_many_script, items[0][0], keys, argv, items)
        return [int(v) for v in values]

    async def ttl(self, key: str) -> float | None:
        """See :meth:`RedisStore.ttl`."""
        return _seconds(await self._command(key, "PTTL", self._k(key), read=True))

    async def expire(self, key: str, ttl: float) -> bool:
        """See :meth:`RedisStore.expire`."""
        check_ttl(ttl)
        return bool(await self._command(key, "PEXPIRE", self._k(key), _millis(ttl)))

    async def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        """See :meth:`RedisStore.sadd`."""
        check_ttl(ttl)
        if not members:
            return 0
        if ttl is None:
            return int(await self._command(key, "SADD", self._k(key), *members))
        added = 0
        for start in range(0, len(members), _SADD_CHUNK):
            chunk = list(members[start : start + _SADD_CHUNK])
            added += int(await self._script(self._sadd_script, key, [self._k(key)], [_millis(ttl), *chunk]))
        return added

    async def srem(self, key: str, *members: str) -> int:
        """See :meth:`RedisStore.srem`."""
        if not members:
            return 0
        return int(await self._command(key, "SREM", self._k(key), *members))

    async def smembers(self, key: str) -> builtins.set[str]:
        """See :meth:`RedisStore.smembers`."""
        return {str(m) for m in await self._command(key, "SMEMBERS", self._k(key), read=True)}

    async def sismember(self, key: str, member: str) -> bool:
        """See :meth:`RedisStore.sismember`."""
        return bool(await self._command(key, "SISMEMBER", self._k(key), member, read=True))

    async def scan(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`RedisStore.scan`."""
        pattern = self._scan_pattern(prefix)
        strip = len(self._prefix)
        seen: builtins.set[str] = set()
        cursor: Any = 0
        while True:
            cursor, keys = await self._command(prefix, "SCAN", cursor, "MATCH", pattern, "COUNT",
                                               _SCAN_COUNT, read=True)
            for full in map(str, keys):
                if full not in seen:
                    seen.add(full)
                    yield full[strip:]
            if int(cursor) == 0:
                return

    async def ping(self) -> None:
        """See :meth:`RedisStore.ping`."""
        await self._command("", "PING", read=True)

    async def close(self) -> None:
        """Close the pool's connections; later calls raise StoreUnavailable."""
        self._closed = True
        await self._client.connection_pool.disconnect()


async def _async_ignore(_error: Exception) -> None:
    """Retry callback: redis-py has already dropped the failed connection."""
