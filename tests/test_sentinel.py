"""The store behind Redis Sentinel: a real primary, replica and three Sentinels on loopback.

Each failover test starts its own cluster (about 1 s) and kills the primary by PID; the
Sentinels (down-after 1000 ms) promote the replica in 2-4 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from harness.sentinel import SentinelCluster, missing_sentinel
from mailwarden.config import ConfigError, parse_config
from mailwarden.store import (
    AsyncRedisStore,
    RedisStore,
    SentinelSettings,
    StoreCall,
    StoreUnavailable,
    async_store_of,
    store_of,
)

# The failover tests run real servers; the settings tests below are unit tests.
needs_servers = pytest.mark.skipif(missing_sentinel() is not None, reason=str(missing_sentinel()))


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    with SentinelCluster(relay=True) as running:
        yield running


def _store_config(cluster: SentinelCluster, prefix: str) -> str:
    sentinels = ", ".join(f'"{a}"' for a in cluster.addresses)
    return (f'[store]\nbackend = "redis"\nredis_url = "{cluster.url}"\nkey_prefix = "{prefix}"\n'
            f"timeout = 0.5\nsentinels = [{sentinels}]\n")


def _wait_replicated(cluster: SentinelCluster, key: str, value: str) -> None:
    """Replication is asynchronous: wait until the replica holds ``key`` = ``value``."""
    deadline = time.monotonic() + 5
    with redis.Redis(port=cluster.replica.port, decode_responses=True) as replica:
        while replica.get(key) != value:
            assert time.monotonic() < deadline, f"{key} did not reach the replica"
            time.sleep(0.02)


def _until(call: Callable[[], object], timeout: float) -> object:
    """``call()``'s first answer that is not StoreUnavailable, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.redis
@needs_servers
def test_configured_store_follows_the_primary_through_a_failover(cluster: SentinelCluster) -> None:
    store = store_of(parse_config(_store_config(cluster, "fo:")).store)
    assert isinstance(store, RedisStore)
    store.set("kept", "yes")
    assert store.incr("n", ttl=60) == 1
    store.sadd("members", "a", "b")
    _wait_replicated(cluster, "fo:n", "1")
    cluster.kill_primary()
    with pytest.raises(StoreUnavailable, match=r"sentinel mymaster via 127\.0\.0\.1:"):
        store.get("kept")  # the Sentinels still name the dead primary
    took = cluster.wait_failover()
    assert took < 10
    assert _until(lambda: store.get("kept"), 5) == "yes"
    assert store.smembers("members") == {"a", "b"}
    assert store.incr("n", ttl=60) == 2
    assert cluster.primary_port() == cluster.replica.port
    store.close()


@pytest.mark.redis
@needs_servers
def test_a_write_whose_reply_was_lost_is_not_sent_again(cluster: SentinelCluster) -> None:
    """The primary applies an INCR and passes it to the replica, the reply never reaches the
    store, then the primary dies. The counter ends at 1: sending the INCR again (to the old
    primary or the new one) would make it 2."""
    assert cluster.relay is not None
    store = RedisStore.from_sentinel(SentinelSettings(tuple(cluster.addresses)), cluster.url,
                                     key_prefix="inflight:", socket_timeout=1.0)
    assert store.incr("warm-up") == 1  # the script is loaded: the next INCR is one EVALSHA
    cluster.relay.cut_reply_of(b"inflight:hits")
    with pytest.raises(StoreUnavailable):
        store.incr("hits", ttl=60)
    assert cluster.relay.cut.is_set()
    _wait_replicated(cluster, "inflight:hits", "1")
    cluster.kill_primary()
    cluster.wait_failover()
    assert _until(lambda: store.get("hits"), 5) == "1"
    assert store.incr("hits", ttl=60) == 2
    store.close()


@pytest.mark.redis
@needs_servers
def test_operations_made_together_follow_the_primary_and_a_lost_write_is_not_sent_again(
    cluster: SentinelCluster,
) -> None:
    """As above, for a pipeline: the counter's script loses its reply, the read after it
    is sent once more; after the failover the same operations reach the new primary."""
    assert cluster.relay is not None
    store = RedisStore.from_sentinel(SentinelSettings(tuple(cluster.addresses)), cluster.url,
                                     key_prefix="pipe:", socket_timeout=1.0)
    store.set("kept", "yes")
    assert store.incr("warm-up") == 1
    cluster.relay.cut_reply_of(b"pipe:hits")
    results = store.call_many([StoreCall("incr_many", ([("hits", 1, 60.0)],)), StoreCall("get", ("kept",))])
    assert isinstance(results[0], StoreUnavailable)
    assert results[1] == "yes"
    assert cluster.relay.cut.is_set()
    _wait_replicated(cluster, "pipe:hits", "1")
    cluster.kill_primary()
    cluster.wait_failover()

    def reads() -> list[object]:
        answers = store.call_many([StoreCall("get", ("hits",)), StoreCall("get_many", (["kept"],))])
        failed = [a for a in answers if isinstance(a, StoreUnavailable)]
        if failed:
            raise failed[0]
        return answers

    assert _until(reads, 5) == ["1", ["yes"]]
    assert store.call_many([StoreCall("incr_many", ([("hits", 1, 60.0)],))]) == [[2]]
    store.close()


@pytest.mark.redis
@needs_servers
def test_async_store_follows_the_primary_through_a_failover(cluster: SentinelCluster) -> None:
    async def scenario() -> None:
        store = async_store_of(parse_config(_store_config(cluster, "afo:")).store)
        assert isinstance(store, AsyncRedisStore)
        assert await store.incr("n") == 1
        cluster.kill_primary()
        await asyncio.to_thread(cluster.wait_failover)
        deadline = time.monotonic() + 5
        while True:
            try:
                value = await store.incr("after")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not reach the new primary"
                await asyncio.sleep(0.1)
        assert value == 1
        assert await store.get("after") == "1"
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("extra", "problem"), [
    pytest.param('sentinels = ["127.0.0.1"]', "store.sentinels[0]: sentinel '127.0.0.1': expected host:port",
                 id="no-port"),
    pytest.param('sentinels = ["127.0.0.1:26379"]\nbackend = "sqlite"', 'store.sentinels: only with backend',
                 id="not-redis"),
    pytest.param('sentinels = ["127.0.0.1:26379"]\nredis_url = "unix:///run/redis.sock"',
                 "with sentinels only redis://",
                 id="unix-url"),
    pytest.param('sentinels = ["127.0.0.1:26379"]\nsentinel_service = ""',
                 "store.sentinel_service: must not be empty", id="no-service"),
    pytest.param('sentinels = ["127.0.0.1:26379"]\nsentinel_password_file = "/nonexistent/pw"',
                 "store.sentinel_password_file: /nonexistent/pw is not a file", id="password-file"),
])
def test_sentinel_settings_are_checked(extra: str, problem: str) -> None:
    text = '[store]\nbackend = "redis"\n' if "backend" not in extra else "[store]\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text + extra + "\n")
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_sentinel_settings_reach_the_store(tmp_path: Path) -> None:
    secret = tmp_path / "sentinel.pw"
    secret.write_text("s3ntinel\n")
    cfg = parse_config(
        '[store]\nbackend = "redis"\nredis_url = "redis://:pw@ignored.example:1/3"\n'
        f'sentinels = ["127.0.0.1:26379", "[::1]:26380"]\nsentinel_service = "mail"\n'
        f'sentinel_password_file = "{secret}"\n')
    settings = SentinelSettings(tuple(cfg.store.sentinels), cfg.store.sentinel_service, "s3ntinel")
    assert settings.addresses() == [("127.0.0.1", 26379), ("::1", 26380)]
    assert settings.primary_options(cfg.store.redis_url) == {"db": 3, "username": None, "password": "pw"}
    store = store_of(cfg.store)  # nothing connects before the first command
    assert "sentinel mail via 127.0.0.1:26379,[::1]:26380" in repr(store)
    assert "pw" not in repr(store)
    store.close()
