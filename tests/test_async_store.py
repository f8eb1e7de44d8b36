"""The asyncio stores: AsyncRedisStore against a real redis-server, ThreadedStore over
SQLite and memory; the same operations, semantics and errors as the blocking stores."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.ports import free_port
from harness.redisserver import RedisServer
from mailwarden.store import (
    AsyncRedisStore,
    AsyncStore,
    MemoryStore,
    SQLiteStore,
    Store,
    StoreUnavailable,
    StoreWrapper,
    ThreadedStore,
    open_async_store,
)
from tests.test_store import REDIS_CALLS, FakeRedis

T = 0.3
"""TTL of the expiry checks (seconds; these tests really sleep)."""

_R = TypeVar("_R")

ASYNC_BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


def run(factory: Callable[[], AsyncStore], body: Callable[[AsyncStore], Awaitable[_R]]) -> _R:
    """Run ``body`` with a store made on a new event loop, closed after it."""

    async def main() -> _R:
        store = factory()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture(params=ASYNC_BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], AsyncStore]:
    name: str = request.param
    if name == "memory":
        return lambda: ThreadedStore(MemoryStore())
    if name == "sqlite":
        return lambda: ThreadedStore(SQLiteStore(tmp_path / "async.sqlite"))
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"a{uuid.uuid4().hex[:8]}:"
    return lambda: AsyncRedisStore(server.url, key_prefix=prefix)


def test_every_operation(make_store: Callable[[], AsyncStore]) -> None:
    async def body(s: AsyncStore) -> None:
        assert isinstance(s, AsyncStore)
        await s.ping()
        assert await s.get("k") is None
        await s.set("k", "値", ttl=60)
        assert await s.get("k") == "値"
        remaining = await s.ttl("k")
        assert remaining is not None
        assert 59 < remaining <= 60
        await s.set("k", "v2")
        assert await s.ttl("k") is None, "set without ttl clears the expiry"
        assert await s.add("k", "other") is False
        assert await s.add("new", "first", ttl=T) is True
        assert await s.get_many(["k", "missing", "new"]) == ["v2", None, "first"]
        assert await s.get_many([]) == []
        assert await s.incr("c", ttl=T) == 1
        assert await s.incr("c", 4, ttl=60) == 5
        left = await s.ttl("c")
        assert left is not None
        assert left <= T, "incr never extends an expiry"
        assert await s.incr_many([("c", 1, None), ("d", -2, 60.0), ("c", 1, None)]) == [6, -2, 7]
        assert await s.incr_many([]) == []
        assert await s.expire("k", 60) is True
        assert await s.expire("missing", 60) is False
        assert await s.sadd("set", "a", "b", "a", ttl=60) == 2
        assert await s.sadd("set", "c") == 1
        assert await s.smembers("set") == {"a", "b", "c"}
        assert await s.sismember("set", "b") is True
        assert await s.sismember("set", "z") is False
        assert await s.srem("set", "a", "z") == 1
        assert sorted([key async for key in s.scan("")]) == ["c", "d", "k", "new", "set"]
        assert [key async for key in s.scan("se")] == ["set"]
        assert await s.delete("k", "set", "missing") == 2
        await asyncio.sleep(T * 1.2)
        assert await s.get_many(["new", "c"]) == [None, None], "expired"
        assert await s.add("new", "again") is True

    run(make_store, body)


def test_errors(make_store: Callable[[], AsyncStore]) -> None:
    async def body(s: AsyncStore) -> None:
        await s.set("c", "1")
        await s.set("text", "abc")
        await s.sadd("set", "m")
        with pytest.raises(TypeError):
            await s.get("set")
        with pytest.raises(TypeError):
            await s.sadd("text", "m")
        with pytest.raises(TypeError, match="set"):
            await s.incr_many([("c", 1, None), ("fresh", 1, 60.0), ("set", 1, None)])
        with pytest.raises(ValueError, match="text"):
            await s.incr_many([("c", 1, None), ("fresh", 1, 60.0), ("text", 1, None)])
        assert await s.get_many(["c", "fresh"]) == ["1", None], "nothing changed"
        with pytest.raises(ValueError, match="ttl"):
            await s.set("c", "2", ttl=0)
        await s.close()
        with pytest.raises(StoreUnavailable):
            await s.get("c")

    run(make_store, body)


def test_concurrent_increments_are_exact(make_store: Callable[[], AsyncStore]) -> None:
    async def body(s: AsyncStore) -> list[str | None]:
        async def worker() -> None:
            for _ in range(50):
                await s.incr_many([("hits", 1, 60.0), ("bytes", 100, 60.0)])

        await asyncio.gather(*(worker() for _ in range(20)))
        return await s.get_many(["hits", "bytes"])

    assert run(make_store, body) == ["1000", "100000"]


# --------------------------------------------------------------------------
# ThreadedStore
# --------------------------------------------------------------------------


class _Recorder(StoreWrapper):
    """Records the thread of every call."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.threads: list[str] = []

    def _call(self, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
        self.threads.append(threading.current_thread().name)
        return fn(*args, **kwargs)


def test_threaded_store_runs_in_the_default_executor() -> None:
    recorder = _Recorder(MemoryStore())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(2, thread_name_prefix="mw-pool")
        loop.set_default_executor(pool)
        store = ThreadedStore(recorder)
        await store.set("k", "v")
        assert await store.get("k") == "v"
        assert await store.sadd("s", "a", ttl=60) == 1
        assert [k async for k in store.scan("")] == ["k", "s"]
        await store.close()

    asyncio.run(main())
    assert recorder.threads
    assert all(name.startswith("mw-pool") for name in recorder.threads), recorder.threads


def test_threaded_store_keeps_the_loop_free(tmp_path: Path) -> None:
    """A slow blocking call (a locked SQLite file) does not stop other work on the loop."""

    class Slow(StoreWrapper):
        def _call(self, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
            time.sleep(0.3)
            return fn(*args, **kwargs)

    async def main() -> int:
        store = ThreadedStore(Slow(SQLiteStore(tmp_path / "slow.sqlite")))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await store.set("k", "v")
        ticker.cancel()
        await store.close()
        return ticks

    assert asyncio.run(main()) >= 10


# --------------------------------------------------------------------------
# AsyncRedisStore: failures
# --------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_killed_then_back() -> None:
    with RedisServer() as server:

        async def main() -> None:
            store = AsyncRedisStore(server.url, key_prefix="dn:", socket_timeout=1.0)
            await store.set("k", "v")
            assert await store.incr("n", ttl=30) == 1
            # The loop keeps running while Redis stops and starts, as in a daemon.
            await asyncio.to_thread(server.stop)
            started = time.monotonic()
            for call in (store.get("k"), store.incr("n", ttl=30), store.get_many(["k"]), store.ping()):
                with pytest.raises(StoreUnavailable, match="redis store"):
                    await call
            assert time.monotonic() - started < 2.0, "refused at once, no waiting"
            await asyncio.to_thread(server.restart)
            assert await store.get("k") is None, "the restarted server is empty"
            assert await store.incr("n", ttl=30) == 1
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.restart)
            assert await store.incr_many([("n", 1, 30.0)]) == [1], "an idle connection is replaced"
            await store.close()

        asyncio.run(main())


@pytest.mark.redis
def test_redis_stopped_process_times_out() -> None:
    """A Redis that stops answering (SIGSTOP) costs one timeout, not a hang."""
    with RedisServer() as server:
        pid = server.pid
        assert pid is not None

        async def main() -> None:
            store = AsyncRedisStore(server.url, key_prefix="st:", socket_timeout=0.3)
            await store.set("k", "v")
            os.kill(pid, signal.SIGSTOP)
            try:
                for call in (store.get("k"), store.set("k", "w")):
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable, match=r"(?i)timeout"):
                        await call
                    assert time.monotonic() - started < 0.9
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await store.get("k") == "v"
            await store.close()

        asyncio.run(main())


def test_redis_nothing_listening() -> None:
    async def main() -> None:
        store = AsyncRedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="redis store"):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.incr("n", ttl=10)
        with pytest.raises(StoreUnavailable):
            [key async for key in store.scan("")]
        assert time.monotonic() - started < 3.0
        await store.close()

    asyncio.run(main())


async def _listed(keys: AsyncIterator[str]) -> list[str]:
    return [key async for key in keys]


ASYNC_CALLS: dict[str, Callable[[AsyncStore], Awaitable[object]]] = {
    "get": lambda s: s.get("k"),
    "get_many": lambda s: s.get_many(["k", "j"]),
    "ttl": lambda s: s.ttl("k"),
    "smembers": lambda s: s.smembers("k"),
    "scan": lambda s: _listed(s.scan("k")),
    "set": lambda s: s.set("k", "v", ttl=30),
    "add": lambda s: s.add("k", "v"),
    "delete": lambda s: s.delete("k"),
    "incr": lambda s: s.incr("k", ttl=30),
    "incr_many": lambda s: s.incr_many([("k", 1, 30.0), ("j", 2, None)]),
    "sadd": lambda s: s.sadd("k", "m", ttl=30),
    "expire": lambda s: s.expire("k", 30),
}


@pytest.mark.parametrize(("name", "sent"), [(name, n) for name, _, n in REDIS_CALLS])
def test_redis_dropped_connection_resends_a_read_once_and_a_write_never(name: str, sent: int) -> None:
    """As for the blocking store (tests/test_store.py), with the same operations."""
    fake = FakeRedis(lambda n: None)  # every command: the connection closes unanswered

    async def main() -> None:
        store = AsyncRedisStore(fake.url, socket_timeout=1.0)
        with pytest.raises(StoreUnavailable, match="redis store"):
            await ASYNC_CALLS[name](store)
        await store.close()

    asyncio.run(main())
    assert len(fake.commands) == sent
    fake.close()


# --------------------------------------------------------------------------
# open_async_store
# --------------------------------------------------------------------------


def test_open_async_store(tmp_path: Path) -> None:
    kw = {"sqlite_path": str(tmp_path / "o.sqlite"), "redis_url": f"redis://127.0.0.1:{free_port()}/0"}

    async def main() -> None:
        memory = open_async_store("memory", **kw)
        assert isinstance(memory, ThreadedStore)
        assert isinstance(memory.store, MemoryStore)
        lite = open_async_store("sqlite", **kw)
        assert isinstance(lite, ThreadedStore)
        assert isinstance(lite.store, SQLiteStore)
        await lite.set("k", "v")
        await lite.close()
        remote = open_async_store("redis", key_prefix="oa:", timeout=0.5, **kw)
        assert isinstance(remote, AsyncRedisStore)
        assert remote.key_prefix == "oa:"
        await remote.close()
        await memory.close()

    asyncio.run(main())
    assert SQLiteStore(tmp_path / "o.sqlite").get("k") == "v"
    with pytest.raises(ValueError, match="memcached"):
        open_async_store("memcached", **kw)
