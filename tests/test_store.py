"""Contract tests for mailwarden.store, run against every backend.

Memory and SQLite use an injected clock (expiry without sleeping); Redis runs
against a real redis-server and really sleeps, so TTLs are kept short.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest
import redis

from harness.ports import free_port
from harness.redisserver import RedisServer
from mailwarden.store import (
    AsyncRedisStore,
    MemoryStore,
    RedisStore,
    SQLiteStore,
    Store,
    StoreCall,
    StoreUnavailable,
    StoreWrapper,
    open_store,
)

T = 0.4
"""TTL used by expiry tests (seconds); Redis tests sleep fractions of it."""
EPS = 1e-3
"""Float slack: a fake clock near 1.7e9 loses precision when adding 0.4."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    name: str
    store: Store
    advance: Callable[[float], None]
    reopen: Callable[[], Store]
    opened: list[Store] = field(default_factory=list)


BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis), "wrapped"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    opened: list[Store] = []

    def track(store: Store) -> Store:
        opened.append(store)
        return store

    if name in ("memory", "wrapped"):
        clock = FakeClock()
        mem = track(MemoryStore(clock=clock))
        if name == "wrapped":
            mem = StoreWrapper(mem)
        b = Backend(name, mem, clock.advance, lambda: mem)
    elif name == "sqlite":
        clock = FakeClock()
        path = tmp_path / "state" / "mw.sqlite"
        b = Backend(
            name,
            track(SQLiteStore(path, clock=clock)),
            clock.advance,
            lambda: track(SQLiteStore(path, clock=clock)),
        )
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        b = Backend(
            name,
            track(RedisStore(server.url, key_prefix=prefix)),
            time.sleep,
            lambda: track(RedisStore(server.url, key_prefix=prefix)),
        )
    yield b
    for store in opened:
        store.close()


# --------------------------------------------------------------------------
# Contract tests (every backend)
# --------------------------------------------------------------------------


def test_is_a_store(backend: Backend) -> None:
    assert isinstance(backend.store, Store)
    backend.store.ping()


def test_get_set_delete(backend: Backend) -> None:
    s = backend.store
    assert s.get("k") is None
    s.set("k", "v1")
    assert s.get("k") == "v1"
    s.set("k", "v2")
    assert s.get("k") == "v2"
    s.set("empty", "")
    assert s.get("empty") == ""
    assert s.delete("k") == 1
    assert s.get("k") is None
    assert s.delete("k") == 0
    s.set("a", "1")
    s.set("b", "2")
    assert s.delete("a", "missing", "b") == 2
    assert s.delete() == 0
    assert s.get("a") is None
    assert s.get("b") is None


def test_second_handle_sees_writes(backend: Backend) -> None:
    backend.store.set("shared", "x", ttl=60)
    backend.store.sadd("shared-set", "m")
    other = backend.reopen()
    assert other.get("shared") == "x"
    assert other.smembers("shared-set") == {"m"}
    other.incr("shared-counter", 3)
    assert backend.store.get("shared-counter") == "3"


def test_add_only_if_absent(backend: Backend) -> None:
    s = backend.store
    assert s.add("first-seen", "t0") is True
    assert s.add("first-seen", "t1") is False
    assert s.get("first-seen") == "t0"
    s.delete("first-seen")
    assert s.add("first-seen", "t2") is True
    assert s.get("first-seen") == "t2"


def test_add_after_expiry(backend: Backend) -> None:
    s = backend.store
    assert s.add("notice", "1", ttl=T) is True
    assert s.add("notice", "2", ttl=T) is False
    backend.advance(T * 1.25)
    assert s.add("notice", "3", ttl=T) is True
    assert s.get("notice") == "3"


def test_ttl_and_expiry(backend: Backend) -> None:
    s = backend.store
    s.set("pop:192.0.2.1", "alice", ttl=T)
    s.set("forever", "x")
    remaining = s.ttl("pop:192.0.2.1")
    assert remaining is not None
    assert 0 < remaining <= T + EPS
    assert s.ttl("forever") is None
    assert s.ttl("missing") is None
    assert s.get("pop:192.0.2.1") == "alice"
    backend.advance(T * 1.25)
    assert s.get("pop:192.0.2.1") is None
    assert s.ttl("pop:192.0.2.1") is None
    assert s.delete("pop:192.0.2.1") == 0
    assert s.expire("pop:192.0.2.1", T) is False
    assert s.get("forever") == "x"


def test_set_without_ttl_clears_expiry(backend: Backend) -> None:
    s = backend.store
    s.set("k", "a", ttl=T)
    s.set("k", "b")
    assert s.ttl("k") is None
    backend.advance(T * 1.25)
    assert s.get("k") == "b"


def test_expire(backend: Backend) -> None:
    s = backend.store
    assert s.expire("missing", T) is False
    s.set("k", "v")
    assert s.expire("k", T) is True
    remaining = s.ttl("k")
    assert remaining is not None
    assert 0 < remaining <= T + EPS
    backend.advance(T * 1.25)
    assert s.get("k") is None


def test_incr_creates_with_ttl_and_does_not_extend_it(backend: Backend) -> None:
    s = backend.store
    assert s.incr("rl:alice", ttl=T) == 1
    assert s.get("rl:alice") == "1"
    backend.advance(T * 0.6)
    assert s.incr("rl:alice", ttl=T) == 2
    remaining = s.ttl("rl:alice")
    assert remaining is not None
    assert 0 < remaining < T * 0.5, "a later incr must not extend the window"
    backend.advance(T * 0.5)
    assert s.get("rl:alice") is None
    assert s.incr("rl:alice", 5, ttl=T) == 5, "an expired counter restarts at amount"
    remaining = s.ttl("rl:alice")
    assert remaining is not None
    assert remaining > T * 0.5, "a restarted counter gets a fresh window"


def test_incr_amounts_without_ttl(backend: Backend) -> None:
    s = backend.store
    assert s.incr("c") == 1
    assert s.incr("c", 5) == 6
    assert s.incr("c", -2) == 4
    assert s.get("c") == "4"
    assert s.ttl("c") is None
    s.set("n", "41")
    assert s.incr("n") == 42
    s.set("neg", "-7")
    assert s.incr("neg", 2) == -5


def test_incr_gives_ttl_to_a_key_without_expiry(backend: Backend) -> None:
    s = backend.store
    s.set("c", "5")
    assert s.incr("c", ttl=T) == 6
    remaining = s.ttl("c")
    assert remaining is not None
    assert 0 < remaining <= T + EPS


@pytest.mark.parametrize("value", ["abc", "1.5", "", " 3", str(2**63)])
def test_incr_non_integer_raises(backend: Backend, value: str) -> None:
    s = backend.store
    s.set("x", value)
    with pytest.raises(ValueError, match="x"):
        s.incr("x")
    assert s.get("x") == value


def test_incr_overflow_raises(backend: Backend) -> None:
    s = backend.store
    s.set("big", str(2**63 - 1))
    with pytest.raises(ValueError, match="big"):
        s.incr("big")
    assert s.get("big") == str(2**63 - 1)


def test_get_many(backend: Backend) -> None:
    s = backend.store
    s.set("a", "1")
    s.set("b", "2", ttl=T)
    s.set("gone", "x", ttl=T / 4)
    backend.advance(T / 2)
    assert s.get_many(["b", "missing", "a", "gone", "a"]) == ["2", None, "1", None, "1"]
    assert s.get_many([]) == []
    s.sadd("a-set", "m")
    assert s.get_many(["a", "a-set"]) == ["1", None], "a set reads as absent, like MGET"


def test_call_many_makes_every_operation_in_order_and_returns_errors(backend: Backend) -> None:
    s = backend.store
    s.set("k", "v")
    s.sadd("members", "m")
    results = s.call_many([
        StoreCall("get", ("k",)),
        StoreCall("get_many", (["k", "absent"],)),
        StoreCall("incr_many", ([("n", 2, 60.0), ("n", 1, None)],)),
        StoreCall("ttl", ("n",)),
        StoreCall("incr_many", ([("members", 1, None)],)),
        StoreCall("incr_many", ([("k", 1, None)],)),
        StoreCall("sadd", ("new", "a", "b"), {"ttl": 60.0}),
        StoreCall("get_many", ([],)),
        StoreCall("get", ("n",)),
    ])
    assert results[:3] == ["v", ["v", None], [2, 3]]
    assert results[3] is not None
    assert 59 < results[3] <= 60, "the ttl was read after the counters were made"
    assert isinstance(results[4], TypeError)
    assert isinstance(results[5], ValueError)
    assert results[6:] == [2, [], "3"]


def test_get_many_large_batch(backend: Backend) -> None:
    s = backend.store
    keys = [f"k{i}" for i in range(1200)]
    for key in keys[::3]:
        s.set(key, key.upper())
    values = s.get_many(keys)
    assert values == [k.upper() if i % 3 == 0 else None for i, k in enumerate(keys)]


def test_incr_many(backend: Backend) -> None:
    s = backend.store
    s.set("old", "10")
    assert s.incr_many([("new", 2, T), ("old", -3, None), ("new", 5, None)]) == [2, 7, 7]
    assert s.get_many(["new", "old"]) == ["7", "7"]
    remaining = s.ttl("new")
    assert remaining is not None
    assert 0 < remaining <= T + EPS
    assert s.ttl("old") is None
    backend.advance(T * 0.6)
    assert s.incr_many([("new", 1, T)]) == [8]
    remaining = s.ttl("new")
    assert remaining is not None
    assert remaining < T * 0.5, "incr_many must not extend a window either"
    assert s.incr_many([]) == []


def test_incr_many_changes_nothing_on_a_wrong_type(backend: Backend) -> None:
    s = backend.store
    s.set("c", "1")
    s.sadd("a-set", "m")
    with pytest.raises(TypeError, match="a-set"):
        s.incr_many([("c", 1, None), ("fresh", 1, T), ("a-set", 1, None)])
    assert s.get_many(["c", "fresh"]) == ["1", None]
    with pytest.raises(ValueError, match="ttl"):
        s.incr_many([("c", 1, None), ("d", 1, -1.0)])
    assert s.get("c") == "1"


def test_incr_many_changes_nothing_on_a_bad_value(backend: Backend) -> None:
    """A counter that cannot be incremented, even after others were, undoes them all."""
    s = backend.store
    s.set("c", "1", ttl=60)
    s.set("plain", "5")
    s.set("text", "abc")
    s.set("big", str(2**63 - 2))
    for bad in ("text", "big"):
        with pytest.raises(ValueError, match=bad):
            s.incr_many([("c", 1, None), ("fresh", 1, T), ("plain", 2, T), ("c", 1, None), (bad, 2, None)])
        assert s.get_many(["c", "fresh", "plain", "text", "big"]) == ["1", None, "5", "abc", str(2**63 - 2)]
        assert s.ttl("plain") is None, "no expiry was given to a counter without one"
        remaining = s.ttl("c")
        assert remaining is not None
        assert 59 < remaining <= 60, "an expiry is kept"


def test_wrong_kind_of_value(backend: Backend) -> None:
    s = backend.store
    s.sadd("a-set", "m")
    s.set("a-string", "v")
    with pytest.raises(TypeError):
        s.get("a-set")
    with pytest.raises(TypeError):
        s.incr("a-set")
    for call in (
        lambda: s.sadd("a-string", "m"),
        lambda: s.srem("a-string", "m"),
        lambda: s.smembers("a-string"),
        lambda: s.sismember("a-string", "m"),
    ):
        with pytest.raises(TypeError):
            call()
    assert s.add("a-set", "v") is False
    s.set("a-set", "now a string")
    assert s.get("a-set") == "now a string"
    assert s.delete("a-string") == 1
    assert s.sadd("a-string", "m") == 1


def test_sets(backend: Backend) -> None:
    s = backend.store
    assert s.smembers("q") == set()
    assert s.sismember("q", "a") is False
    assert s.srem("q", "a") == 0
    assert s.sadd("q", "a", "b", "a") == 2
    assert s.sadd("q", "b", "c") == 1
    assert s.sadd("q") == 0
    assert s.smembers("q") == {"a", "b", "c"}
    assert s.sismember("q", "b") is True
    assert s.sismember("q", "zz") is False
    assert s.ttl("q") is None
    assert s.srem("q", "a", "zz") == 1
    assert s.smembers("q") == {"b", "c"}
    assert s.srem("q", "b", "c") == 2
    assert s.smembers("q") == set()
    assert "q" not in set(s.scan("q"))
    assert s.delete("q") == 0, "an emptied set no longer exists"


def test_set_ttl_applies_on_creation_only(backend: Backend) -> None:
    s = backend.store
    assert s.sadd("quarantine:idx", "a", ttl=T) == 1
    remaining = s.ttl("quarantine:idx")
    assert remaining is not None
    assert 0 < remaining <= T + EPS
    backend.advance(T * 0.6)
    assert s.sadd("quarantine:idx", "b", ttl=T) == 1
    remaining = s.ttl("quarantine:idx")
    assert remaining is not None
    assert remaining < T * 0.5
    backend.advance(T * 0.5)
    assert s.smembers("quarantine:idx") == set()
    assert s.sismember("quarantine:idx", "a") is False
    assert s.sadd("quarantine:idx", "c") == 1
    assert s.smembers("quarantine:idx") == {"c"}, "members of an expired set must be gone"
    assert s.ttl("quarantine:idx") is None


def test_delete_removes_sets(backend: Backend) -> None:
    s = backend.store
    s.sadd("s", "a", "b")
    assert s.delete("s") == 1
    assert s.smembers("s") == set()
    s.sadd("s", "c")
    assert s.smembers("s") == {"c"}


def test_scan_by_prefix(backend: Backend) -> None:
    s = backend.store
    s.set("pop:192.0.2.1", "a")
    s.set("pop:192.0.2.2", "b", ttl=60)
    s.sadd("pop:set", "x")
    s.set("pox", "not matching")
    s.set("po", "not matching")
    s.set("rl:bob", "1")
    s.set("pop:gone", "x", ttl=T)
    backend.advance(T * 1.25)
    assert sorted(s.scan("pop:")) == ["pop:192.0.2.1", "pop:192.0.2.2", "pop:set"]
    assert sorted(s.scan("")) == sorted(
        ["pop:192.0.2.1", "pop:192.0.2.2", "pop:set", "pox", "po", "rl:bob"]
    )
    assert list(s.scan("nothing:")) == []


def test_scan_prefix_with_glob_characters(backend: Backend) -> None:
    s = backend.store
    s.set("q*[x]?\\1", "1")
    s.set("q*[x]?\\2", "2")
    s.set("qa[x]?\\3", "3")
    s.set("q*x", "4")
    assert sorted(s.scan("q*[x]?\\")) == ["q*[x]?\\1", "q*[x]?\\2"]


def test_scan_many_keys(backend: Backend) -> None:
    s = backend.store
    expected = {f"many:{i:04d}" for i in range(1200)}
    for key in expected:
        s.set(key, "1")
    s.set("man", "x")
    s.set("manz", "x")
    s.set("many;", "x")
    found = list(s.scan("many:"))
    assert len(found) == len(set(found))
    assert set(found) == expected


def test_unicode_keys_and_values(backend: Backend) -> None:
    s = backend.store
    pairs = {
        "greylist:送信者@例え.jp": "メール本文テスト",
        "latin:Grüße-ÄÖÜ-ß": "\xe9\xff\x80\xa0 8-bit",
        "emoji:📬": "✉️ 🚀",
        "ctl:\t\x01": "line1\nline2\r\n",
    }
    for key, value in pairs.items():
        s.set(key, value)
    for key, value in pairs.items():
        assert s.get(key) == value
    assert s.incr("計数:ユーザー") == 1
    assert s.get("計数:ユーザー") == "1"
    s.sadd("隔離", "メッセージ①", "\xfe\xfd", "📎")
    assert s.smembers("隔離") == {"メッセージ①", "\xfe\xfd", "📎"}
    assert s.sismember("隔離", "📎") is True
    assert set(s.scan("greylist:送")) == {"greylist:送信者@例え.jp"}
    assert set(s.scan("計")) == {"計数:ユーザー"}


def test_large_values(backend: Backend) -> None:
    s = backend.store
    ascii_value = "x" * (1 << 20)
    japanese_value = "日本語" * 120_000  # 1.08 MB as UTF-8
    s.set("big:ascii", ascii_value)
    s.set("big:ja", japanese_value, ttl=60)
    assert s.get("big:ascii") == ascii_value
    assert s.get("big:ja") == japanese_value


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_invalid_ttl_rejected(backend: Backend, bad: float) -> None:
    s = backend.store
    s.set("k", "v")
    for call in (
        lambda: s.set("k", "w", ttl=bad),
        lambda: s.add("new", "w", ttl=bad),
        lambda: s.incr("n", ttl=bad),
        lambda: s.expire("k", bad),
        lambda: s.sadd("s", "m", ttl=bad),
    ):
        with pytest.raises(ValueError, match="ttl"):
            call()
    assert s.get("k") == "v"
    assert s.ttl("k") is None
    assert s.get("new") is None
    assert s.get("n") is None


def test_closed_store_is_unavailable(backend: Backend) -> None:
    s = backend.store
    s.set("k", "v")
    s.close()
    with pytest.raises(StoreUnavailable):
        s.get("k")
    with pytest.raises(StoreUnavailable):
        s.incr("n")
    with pytest.raises(StoreUnavailable):
        s.ping()


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------

WORKERS = 4
INCREMENTS = 500


def _sqlite_incr_worker(path: str, barrier: threading.Barrier, n: int) -> None:
    barrier.wait(timeout=10)  # all create the new file at once
    store = SQLiteStore(path)
    barrier.wait(timeout=10)
    for _ in range(n):
        store.incr("hits", ttl=300)
    store.close()


def _redis_incr_worker(url: str, prefix: str, barrier: threading.Barrier, n: int) -> None:
    store = RedisStore(url, key_prefix=prefix)
    barrier.wait(timeout=10)
    for _ in range(n):
        store.incr("hits", ttl=300)
    store.close()


def _exit_codes(procs: list[multiprocessing.process.BaseProcess]) -> list[int | None]:
    """Start ``procs``, wait up to 30 s for them, kill any left (None), return the exit codes."""
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 30
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        return [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _run_processes(target: Callable[..., None], *args: object) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=target, args=(*args, barrier, INCREMENTS), daemon=True)
             for _ in range(WORKERS)]
    assert _exit_codes(procs) == [0] * WORKERS


def test_sqlite_processes_increment_exactly(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "shared.sqlite"
    _run_processes(_sqlite_incr_worker, str(path))
    store = SQLiteStore(path)
    assert store.get("hits") == str(WORKERS * INCREMENTS)
    remaining = store.ttl("hits")
    assert remaining is not None
    assert 0 < remaining <= 300
    store.close()


@pytest.mark.redis
def test_redis_processes_increment_exactly(redis_server: RedisServer) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}:"
    _run_processes(_redis_incr_worker, redis_server.url, prefix)
    store = RedisStore(redis_server.url, key_prefix=prefix)
    assert store.get("hits") == str(WORKERS * INCREMENTS)
    remaining = store.ttl("hits")
    assert remaining is not None
    assert 0 < remaining <= 300
    store.close()


def test_sqlite_threads_share_one_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "threads.sqlite")
    threads, per_thread = 8, 200
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            for j in range(per_thread):
                store.incr("hits")
                store.sadd("members", f"{i}:{j}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert errors == []
    assert store.get("hits") == str(threads * per_thread)
    assert len(store.smembers("members")) == threads * per_thread
    store.close()


def test_sqlite_pool_is_bounded(tmp_path: Path) -> None:
    """Many short-lived threads (one per SMTP connection) share a few connections."""
    store = SQLiteStore(tmp_path / "pool.sqlite", max_connections=3)
    peak: list[int] = []

    def work() -> None:
        for _ in range(20):
            store.incr("hits")
            peak.append(store._open)

    for _round in range(5):
        pool = [threading.Thread(target=work) for _ in range(16)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=30)
    assert store.get("hits") == str(5 * 16 * 20)
    assert max(peak) <= 3
    store.close()
    assert store._open == 0, "close() closed every pooled connection"


def test_sqlite_pool_exhausted_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "busy.sqlite", max_connections=1, busy_timeout=0.2)
    held = store._acquire()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="connections busy"):
        store.get("x")
    assert 0.15 < time.monotonic() - started < 2
    store._release(held)
    assert store.get("x") is None
    store.close()


def test_sqlite_close_while_another_thread_works(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "closing.sqlite")
    stop = threading.Event()
    outcomes: list[str] = []

    def work() -> None:
        while not stop.is_set():
            try:
                store.incr("n")
            except StoreUnavailable:
                outcomes.append("closed")
                return
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(repr(exc))
                return

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.05)
    store.close()
    stop.set()
    t.join(timeout=10)
    assert outcomes in ([], ["closed"])
    assert store._open == 0
    with pytest.raises(StoreUnavailable, match="closed"):
        store.get("n")


def _child_incr(store: SQLiteStore) -> None:
    for _ in range(INCREMENTS):
        store.incr("forked")


def test_sqlite_store_opened_before_fork(tmp_path: Path) -> None:
    """A store opened in a parent works in forked children (fresh connections) and in the parent."""
    store = SQLiteStore(tmp_path / "fork.sqlite")
    store.incr("forked")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child_incr, args=(store,), daemon=True) for _ in range(2)]
    assert _exit_codes(procs) == [0, 0]
    assert store.incr("forked") == 2 * INCREMENTS + 2
    store.close()


def _threads_named(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_sqlite_checkpoints_run_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.sqlite"
    name = f"mw-sqlite-checkpoint {path}"
    store = SQLiteStore(path, checkpoint_interval=0.05)
    with store._connection() as conn:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 1000, "few checkpoints in commits"
    for i in range(300):
        store.incr_many([(f"k{i}", i, None)])
    assert _threads_named(name) == 1
    time.sleep(0.3)
    # The main database file alone (without its log) holds the writes once checkpointed.
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(path.read_bytes())
    raw = sqlite3.connect(copy)
    assert raw.execute("SELECT value FROM kv WHERE key = 'k299'").fetchone() == ("299",)
    raw.close()
    store.close()
    deadline = time.monotonic() + 5
    while _threads_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _threads_named(name) == 0, "close() stops the checkpoint thread"


def _report_start(path: str, conn: multiprocessing.connection.Connection) -> None:
    conn.send(time.monotonic())
    SQLiteStore(path).incr("child")


def test_fork_waits_for_a_running_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork never copies a checkpoint thread's half-held SQLite locks into the child."""
    running, ended = threading.Event(), []

    def slow_checkpoint(conn: sqlite3.Connection) -> None:
        running.set()
        time.sleep(0.3)
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        ended.append(time.monotonic())

    monkeypatch.setattr("mailwarden.store.sqlite._checkpoint", slow_checkpoint)
    path = tmp_path / "ckpt.sqlite"
    store = SQLiteStore(path, checkpoint_interval=0.01)
    store.incr("parent")
    assert running.wait(5)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_report_start, args=(str(path), there), daemon=True)
    assert _exit_codes([child]) == [0]
    started = here.recv()
    assert ended and started >= ended[0], "the child was forked during the checkpoint"
    assert store.get("child") == "1"
    store.close()


def test_checkpoint_thread_ends_with_a_forgotten_store(tmp_path: Path) -> None:
    path = tmp_path / "gone.sqlite"
    name = f"mw-sqlite-checkpoint {path}"
    store = SQLiteStore(path, checkpoint_interval=0.01)
    store.incr("n")
    assert _threads_named(name) == 1
    del store  # never closed
    deadline = time.monotonic() + 5
    while _threads_named(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _threads_named(name) == 0, "the thread must not keep an unreferenced store alive"


def test_sqlite_checkpoints_in_commits_when_asked(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "auto.sqlite", checkpoint_interval=0)
    with store._connection() as conn:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000, "SQLite's default"
    store.close()


def _open_fds(path: Path) -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()).startswith(str(path)):
                count += 1
        except OSError:
            continue
    return count


def test_sqlite_short_lived_threads_hold_few_file_descriptors(tmp_path: Path) -> None:
    """A thread per SMTP connection (libmilter) must not mean a database handle per connection."""
    db = tmp_path / "state.sqlite3"
    store = SQLiteStore(db, max_connections=2, checkpoint_interval=0)

    def one_smtp_connection(i: int) -> None:
        store.set(f"k{i}", "v", ttl=60)
        assert store.get(f"k{i}") == "v"

    for batch in range(4):
        threads = [threading.Thread(target=one_smtp_connection, args=(batch * 25 + i,)) for i in range(25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert _open_fds(db) <= 2 * 3, "two connections, each with the database, its log and shm"
    assert sorted(store.scan("k9")) == ["k9", *[f"k9{i}" for i in range(10)]]
    store.close()
    assert _open_fds(db) == 0


def test_memory_threads_share_one_store() -> None:
    store = MemoryStore()
    threads, per_thread = 8, 2000
    pool = [
        threading.Thread(target=lambda: [store.incr("hits") for _ in range(per_thread)])
        for _ in range(threads)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert store.get("hits") == str(threads * per_thread)


# --------------------------------------------------------------------------
# SQLite specifics
# --------------------------------------------------------------------------


def test_sqlite_creates_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite"
    store = SQLiteStore(path)
    store.set("k", "v")
    assert path.is_file()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    store.close()


def test_sqlite_path_under_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    path = blocker / "sub" / "state.sqlite"
    with pytest.raises(StoreUnavailable, match="plain-file"):
        SQLiteStore(path)


def test_sqlite_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match=re.escape(str(tmp_path))):
        SQLiteStore(tmp_path)


def test_sqlite_garbage_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(b"this is definitely not an sqlite database\n" * 200)
    with pytest.raises(StoreUnavailable, match=r"garbage\.sqlite"):
        SQLiteStore(path)


def test_sqlite_locked_database_raises_after_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    store = SQLiteStore(path, busy_timeout=0.2)
    store.set("k", "before")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert store.get("k") == "before", "WAL readers are not blocked by a writer"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            store.set("k", "during")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.incr("n")
        assert time.monotonic() - started < 2.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.set("k", "after")
    assert store.get("k") == "after"
    assert store.incr("n") == 1
    store.close()


def test_sqlite_real_clock_expiry(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "real.sqlite")
    store.set("k", "v", ttl=0.15)
    assert store.get("k") == "v"
    time.sleep(0.2)
    assert store.get("k") is None
    store.close()


def _rows(path: Path) -> tuple[int, int]:
    raw = sqlite3.connect(path)
    try:
        kv = raw.execute("SELECT count(*) FROM kv").fetchone()[0]
        members = raw.execute("SELECT count(*) FROM members").fetchone()[0]
        return int(kv), int(members)
    finally:
        raw.close()


def test_sqlite_purges_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "purge.sqlite"
    store = SQLiteStore(path, clock=clock)
    for i in range(300):
        store.set(f"pop:{i}", "x", ttl=10)
    store.sadd("qset", *(f"m{i}" for i in range(50)), ttl=10)
    store.set("keep", "x")
    assert _rows(path) == (302, 50)
    clock.advance(11)
    for i in range(300):
        store.set("writes", str(i))
    kv_rows, _ = _rows(path)
    assert kv_rows < 302, "writes must purge some expired rows"
    assert store.purge_expired() >= 0
    assert _rows(path) == (2, 0)
    assert store.get("keep") == "x"
    store.close()


# --------------------------------------------------------------------------
# Redis specifics
# --------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_key_prefix_isolation(redis_server: RedisServer) -> None:
    tag = uuid.uuid4().hex[:8]
    a = RedisStore(redis_server.url, key_prefix=f"a{tag}:")
    b = RedisStore(redis_server.url, key_prefix=f"b{tag}:")
    a.set("k", "from-a")
    b.set("k", "from-b")
    a.sadd("s", "x")
    assert a.get("k") == "from-a"
    assert b.get("k") == "from-b"
    assert b.smembers("s") == set()
    assert list(a.scan("")) != [] and set(a.scan("")) == {"k", "s"}
    assert set(b.scan("")) == {"k"}
    assert b.delete("k", "s") == 1
    assert a.get("k") == "from-a"
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert raw.get(f"a{tag}:k") == "from-a"
    assert raw.exists(f"b{tag}:k") == 0
    raw.close()
    a.close()
    b.close()


@pytest.mark.redis
def test_redis_nothing_listening_is_unavailable_quickly() -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=str(port)):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.incr("n", ttl=10)
    with pytest.raises(StoreUnavailable):
        list(store.scan("x"))
    assert time.monotonic() - started < 3.0
    store.close()


@pytest.mark.redis
def test_redis_unresponsive_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="redis"):
            store.get("k")
        assert time.monotonic() - started < 2.0
        store.close()


@pytest.mark.redis
def test_redis_password_not_in_error_message() -> None:
    port = free_port()
    store = RedisStore(f"redis://:hunter2secret@127.0.0.1:{port}/0")
    with pytest.raises(StoreUnavailable) as info:
        store.ping()
    assert "hunter2secret" not in str(info.value)
    assert "***" in str(info.value)
    assert "hunter2secret" not in repr(store)
    store.close()


@pytest.mark.redis
def test_redis_server_down_then_back() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="dn:")
        store.set("k", "v")
        assert store.incr("n", ttl=30) == 1
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get("k")
        with pytest.raises(StoreUnavailable):
            store.incr("n", ttl=30)
        with pytest.raises(StoreUnavailable):
            store.ping()
        assert time.monotonic() - started < 3.0
        server.restart()
        assert store.get("k") is None, "the restarted server is empty"
        assert store.incr("n", ttl=30) == 1
        store.set("k", "again")
        assert store.get("k") == "again"
        store.close()


def test_redis_restart_while_idle_is_not_an_error() -> None:
    """A connection the server closed while idle is replaced: before a write is sent,
    or after a read found it closed (a read may be sent twice, a write never)."""
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="idle:")
        store.set("k", "v")
        server.stop()
        server.restart()
        assert store.incr_many([("n", 1, 30.0)]) == [1]
        server.stop()
        server.restart()
        assert store.get_many(["k", "n"]) == [None, None]
        server.stop()
        server.restart()
        assert store.get("k") is None
        store.close()


class FakeRedis:
    """A RESP server on loopback that records the commands it is sent.

    CLIENT commands (redis-py's greeting on connect) are answered OK. Any other command
    gets ``answer(n)`` (n counts them from 1): bytes to send (b"": nothing, a silent
    server), or None to close the connection without an answer.
    """

    def __init__(self, answer: Callable[[int], bytes | None], *, close_after_reply: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.answer = answer
        self.close_after_reply = close_after_reply
        self.connections = 0
        self.commands: list[list[str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        reader = hiredis.Reader(encoding="utf-8")
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    if command[0].upper() == "CLIENT":
                        conn.sendall(b"+OK\r\n")
                        continue
                    self.commands.append(command)
                    reply = self.answer(len(self.commands))
                    if reply is None:
                        return
                    conn.sendall(reply)
                    if self.close_after_reply:
                        return

    def close(self) -> None:
        self.listener.close()


def test_redis_read_that_times_out_is_not_sent_again() -> None:
    fake = FakeRedis(lambda n: b"$-1\r\n" if n == 1 else b"")
    store = RedisStore(fake.url, socket_timeout=0.3)
    assert store.get("k") is None
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"(?i)timeout"):
        store.get("k")
    assert time.monotonic() - started < 0.55, "one timeout, not two"
    assert len(fake.commands) == 2
    assert fake.connections == 1
    store.close()
    fake.close()


REDIS_CALLS: list[tuple[str, Callable[[Store], object], int]] = [
    ("get", lambda s: s.get("k"), 2),
    ("get_many", lambda s: s.get_many(["k", "j"]), 2),
    ("ttl", lambda s: s.ttl("k"), 2),
    ("smembers", lambda s: s.smembers("k"), 2),
    ("scan", lambda s: list(s.scan("k")), 2),
    ("set", lambda s: s.set("k", "v", ttl=30), 1),
    ("add", lambda s: s.add("k", "v"), 1),
    ("delete", lambda s: s.delete("k"), 1),
    ("incr", lambda s: s.incr("k", ttl=30), 1),
    ("incr_many", lambda s: s.incr_many([("k", 1, 30.0), ("j", 2, None)]), 1),
    ("sadd", lambda s: s.sadd("k", "m", ttl=30), 1),
    ("expire", lambda s: s.expire("k", 30), 1),
]


@pytest.mark.parametrize(("call", "sent"), [pytest.param(c, n, id=name) for name, c, n in REDIS_CALLS])
def test_redis_dropped_connection_resends_a_read_once_and_a_write_never(
    call: Callable[[Store], object], sent: int
) -> None:
    fake = FakeRedis(lambda n: None)  # every command: the connection closes unanswered
    store = RedisStore(fake.url, socket_timeout=1.0)
    with pytest.raises(StoreUnavailable, match="redis store"):
        call(store)
    assert len(fake.commands) == sent
    store.close()
    fake.close()


@pytest.mark.parametrize("reply", [
    pytest.param(b"$5\r\nab", id="cut-short"),
    pytest.param(b"?garbage\r\n", id="not-resp"),
    pytest.param(b"-ERR something odd\r\n", id="unknown-error"),
    pytest.param(b"-LOADING Redis is loading the dataset in memory\r\n", id="loading"),
    pytest.param(b"-READONLY You can't write against a read only replica.\r\n", id="replica"),
])
def test_redis_broken_answers_are_unavailable(reply: bytes) -> None:
    fake = FakeRedis(lambda n: reply, close_after_reply=True)
    store = RedisStore(fake.url, socket_timeout=1.0)
    for call in (lambda: store.set("k", "v"), lambda: store.incr("n"), lambda: store.get("k")):
        with pytest.raises(StoreUnavailable, match="redis store"):
            call()
    store.close()
    fake.close()


@pytest.fixture(scope="module")
def secured() -> Iterator[RedisServer]:
    with RedisServer(password="t0ps3cret", unix_socket=True) as server:
        yield server


@pytest.mark.redis
def test_redis_urls_select_the_database_and_authenticate(secured: RedisServer) -> None:
    """The URL forms redis-py reads: password and user (percent-encoded), db in the path or the query."""
    raw = redis.Redis(port=secured.port, password="t0ps3cret", decode_responses=True)
    raw.acl_setuser("mw", enabled=True, passwords=["+p@ss/w"], keys=["*"], commands=["+@all"])
    port, sock = secured.port, secured.socket_path
    urls = {
        3: f"redis://:t0ps3cret@127.0.0.1:{port}/3",
        4: f"redis://127.0.0.1:{port}?db=4&password=t0ps3cret",
        5: f"redis://mw:p%40ss%2Fw@127.0.0.1:{port}/5",
        6: f"unix://{sock}?db=6&password=t0ps3cret",
        7: f"unix://mw:p%40ss%2Fw@{sock}?db=7",
    }
    for db, url in urls.items():
        store = RedisStore(url, key_prefix="url:")
        store.set("db", "日本語")
        assert store.get_many(["db"]) == ["日本語"]
        store.close()
        raw.execute_command("SELECT", db)
        assert raw.get("url:db") == "日本語", url
        raw.execute_command("SELECT", 0)
    assert raw.get("url:db") is None
    raw.close()


@pytest.mark.redis
def test_redis_wrong_or_missing_password_is_unavailable(secured: RedisServer) -> None:
    for url in (f"redis://:wrong@127.0.0.1:{secured.port}/0", f"redis://127.0.0.1:{secured.port}/0"):
        store = RedisStore(url)
        with pytest.raises(StoreUnavailable, match="redis store"):
            store.get("k")
        with pytest.raises(StoreUnavailable, match="redis store"):
            store.set("k", "v")
        store.close()


@pytest.mark.parametrize("url", ["http://h/0", "redis://h/x", "unix://", "127.0.0.1:6379"])
def test_redis_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="redis url"):
        RedisStore(url)
    with pytest.raises(ValueError, match="redis url"):
        AsyncRedisStore(url)


def test_redis_password_in_the_query_is_masked() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0?password=hunter2secret")
    with pytest.raises(StoreUnavailable) as info:
        store.ping()
    assert "hunter2secret" not in str(info.value)
    assert "hunter2secret" not in repr(store)
    store.close()


def test_redis_connections_are_per_thread() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="thr:")
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(300):
                    store.incr_many([("a", 1, 30.0), ("b", 2, 30.0)])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        pool = [threading.Thread(target=work) for _ in range(6)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=30)
        assert errors == []
        assert store.get_many(["a", "b"]) == ["1800", "3600"]
        store.close()


def test_redis_short_lived_threads_give_their_connection_back() -> None:
    """A thread keeps its connection while it lives; when it ends, the next thread reuses it."""
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="short:")
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        store.set("k", "v")
        for _ in range(40):
            t = threading.Thread(target=store.get, args=("k",))
            t.start()
            t.join(timeout=10)
        clients = raw.info("clients")["connected_clients"]
        assert clients <= 3, f"{clients} connections: the threads' connections were not given back"
        assert store.get("k") == "v"
        store.close()
        raw.close()


def _incr_after_fork(store: RedisStore, conn: multiprocessing.connection.Connection) -> None:
    try:
        conn.send([store.incr("forked", ttl=300) for _ in range(200)][-1])
    except BaseException as exc:  # noqa: BLE001
        conn.send(repr(exc))


@pytest.mark.redis
def test_redis_store_used_before_fork_connects_again_in_the_child(redis_server: RedisServer) -> None:
    """A forked child never writes on its parent's connection: the counts stay exact."""
    prefix = f"f{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, key_prefix=prefix)
    assert store.incr("forked", ttl=300) == 1  # the parent holds a connection now
    ctx = multiprocessing.get_context("fork")
    receivers, procs = [], []
    for _ in range(3):
        mine, theirs = ctx.Pipe(duplex=False)
        receivers.append(mine)
        procs.append(ctx.Process(target=_incr_after_fork, args=(store, theirs), daemon=True))
    assert _exit_codes(procs) == [0, 0, 0]
    assert all(isinstance(r.recv(), int) for r in receivers)
    for _ in range(100):
        store.incr("forked", ttl=300)
    assert store.get("forked") == str(1 + 3 * 200 + 100)
    store.close()


@pytest.mark.redis
def test_redis_script_unknown_to_the_server_is_loaded_and_counts_once(redis_server: RedisServer) -> None:
    """After SCRIPT FLUSH (or a failover to a server that never saw the script) the
    increment is made once: NOSCRIPT means it did not run."""
    prefix = f"s{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, key_prefix=prefix)
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert store.incr_many([("a", 1, 30.0), ("b", 5, None)]) == [1, 5]
    raw.script_flush()
    assert store.incr_many([("a", 1, 30.0), ("b", 5, None)]) == [2, 10]
    raw.script_flush()
    assert store.sadd("set", "x", ttl=30) == 1
    assert store.smembers("set") == {"x"}
    store.close()
    raw.close()


@pytest.mark.redis
def test_redis_arguments_are_packed_as_redis_py_packs_them(redis_server: RedisServer) -> None:
    """Text, numbers and text hiredis refuses to encode (a lone surrogate: replaced, as
    redis-py's encoder does) reach Redis the same way."""
    store = RedisStore(redis_server.url, key_prefix=f"pk{uuid.uuid4().hex[:8]}:")
    store.set("日本語", "値 ✓")
    assert store.get("日本語") == "値 ✓"
    store.set("odd", "a\udcffb", ttl=30)
    assert store.get("odd") == "a?b"
    assert store.incr_many([("n", -3, 30.0), ("n", 10, None)]) == [-3, 7]
    store.close()


def test_redis_call_many_sends_its_commands_before_reading_a_reply() -> None:
    fake = FakeRedis(lambda n: b"")  # silent: a client waiting for each reply sends one
    store = RedisStore(fake.url, socket_timeout=0.3)
    started = time.monotonic()
    results = store.call_many([StoreCall("get_many", (["a", "b"],)), StoreCall("get", ("c",)),
                               StoreCall("incr_many", ([("d", 1, None)],))])
    assert time.monotonic() - started < 0.55, "one timeout for the whole pipeline"
    assert [c[0].upper() for c in fake.commands] == ["MGET", "GET", "EVALSHA"]
    assert all(isinstance(r, StoreUnavailable) for r in results), "a read that timed out is not sent again"
    store.close()
    fake.close()


def test_redis_call_many_on_a_dropped_connection_resends_reads_once_and_writes_never() -> None:
    fake = FakeRedis(lambda n: None)  # every command: the connection closes unanswered
    store = RedisStore(fake.url, socket_timeout=1.0)
    results = store.call_many([StoreCall("get_many", (["a", "b"],)),
                               StoreCall("incr_many", ([("d", 1, None)],)), StoreCall("get", ("c",))])
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert [c[0].upper() for c in fake.commands] == ["MGET", "MGET", "GET"]
    store.close()
    fake.close()


def test_redis_call_many_loads_the_script_on_noscript() -> None:
    replies = {1: b"$1\r\nv\r\n", 2: b"-NOSCRIPT No matching script.\r\n", 3: b"$1\r\nw\r\n",
               4: b"$40\r\n" + b"0" * 40 + b"\r\n", 5: b"*1\r\n:7\r\n"}
    fake = FakeRedis(lambda n: replies.get(n, b"-ERR unexpected\r\n"))
    store = RedisStore(fake.url, socket_timeout=1.0)
    assert store.call_many([StoreCall("get", ("a",)), StoreCall("incr_many", ([("k", 7, None)],)),
                            StoreCall("get", ("b",))]) == ["v", [7], "w"]
    assert [c[0].upper() for c in fake.commands] == ["GET", "EVALSHA", "GET", "SCRIPT", "EVALSHA"]
    # once every reply of the pipeline was read
    store.close()
    fake.close()


def test_redis_script_sent_as_evalsha_then_loaded_on_noscript() -> None:
    replies = {1: b"-NOSCRIPT No matching script.\r\n", 2: b"$40\r\n" + b"0" * 40 + b"\r\n",
               3: b"*1\r\n:7\r\n"}
    fake = FakeRedis(lambda n: replies.get(n, b"-ERR unexpected\r\n"))
    store = RedisStore(fake.url, socket_timeout=1.0)
    assert store.incr("k", 7) == 7
    assert [c[0].upper() for c in fake.commands] == ["EVALSHA", "SCRIPT", "EVALSHA"]
    assert fake.commands[1][1].upper() == "LOAD"
    store.close()
    fake.close()


# --------------------------------------------------------------------------
# open_store
# --------------------------------------------------------------------------


def test_open_store_memory_and_sqlite(tmp_path: Path) -> None:
    sqlite_path, redis_url = str(tmp_path / "o.sqlite"), "redis://127.0.0.1:1/0"
    mem = open_store("memory", sqlite_path=sqlite_path, redis_url=redis_url)
    assert isinstance(mem, MemoryStore)
    lite = open_store("sqlite", sqlite_path=sqlite_path, redis_url=redis_url)
    assert isinstance(lite, SQLiteStore)
    lite.set("k", "v")
    assert SQLiteStore(tmp_path / "o.sqlite").get("k") == "v"
    lite.close()
    with pytest.raises(ValueError, match="memcached"):
        open_store("memcached", sqlite_path=sqlite_path, redis_url=redis_url)


@pytest.mark.redis
def test_open_store_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    store = open_store(
        "redis",
        sqlite_path=str(tmp_path / "unused.sqlite"),
        redis_url=redis_server.url,
        key_prefix="os:",
        timeout=0.5,
    )
    assert isinstance(store, RedisStore)
    store.set("k", "v")
    assert store.get("k") == "v"
    assert not (tmp_path / "unused.sqlite").exists()
    store.close()
