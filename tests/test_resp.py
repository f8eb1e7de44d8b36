"""The small Redis client under the Redis store: URLs, AUTH/SELECT, unix sockets, failures."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from harness.ports import free_port
from harness.redisserver import RedisServer
from mailwarden.resp import RedisAddress, RedisConnection, RedisError, RedisReplyError
from mailwarden.store import RedisStore, StoreUnavailable


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, db=2)),
    ("redis://redis.internal", RedisAddress("redis.internal", 6379)),
    ("redis://:s%40cret@10.0.0.5:6379/0", RedisAddress("10.0.0.5", 6379, password="s@cret")),
    ("redis://mw:pw@h/3", RedisAddress("h", 6379, db=3, username="mw", password="pw")),
    ("rediss://h:6390", RedisAddress("h", 6390, tls=True)),
    ("redis://h?db=4&password=x", RedisAddress("h", 6379, db=4, password="x")),
    ("unix:///run/redis/redis.sock?db=1", RedisAddress(path="/run/redis/redis.sock", db=1)),
])
def test_urls(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected


@pytest.mark.parametrize("url", ["http://h/0", "redis://h/x", "unix://", "127.0.0.1:6379"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"redis|database|socket"):
        RedisAddress.from_url(url)


@pytest.fixture(scope="module")
def secured() -> Iterator[RedisServer]:
    with RedisServer(password="t0ps3cret", unix_socket=True) as server:
        yield server


@pytest.mark.redis
def test_auth_select_and_replies(secured: RedisServer) -> None:
    conn = RedisConnection(RedisAddress.from_url(secured.url.replace("/0", "/3")), 1.0)
    assert conn.command("SET", "k", "日本語") == "OK"
    assert conn.command("GET", "k") == "日本語"
    assert conn.command("MGET", "k", "nope") == ["日本語", None]
    assert conn.command("INCRBY", "n", 5) == 5
    with pytest.raises(RedisReplyError, match="WRONGTYPE"):
        conn.command("SADD", "k", "m")
    other_db = RedisConnection(RedisAddress.from_url(secured.url), 1.0)
    assert other_db.command("GET", "k") is None, "SELECT 3 was sent"
    conn.close()
    other_db.close()


@pytest.mark.redis
def test_wrong_password_and_no_password(secured: RedisServer) -> None:
    conn = RedisConnection(RedisAddress.from_url(f"redis://:wrong@127.0.0.1:{secured.port}/0"), 1.0)
    with pytest.raises(RedisReplyError, match=r"WRONGPASS|invalid"):
        conn.command("GET", "k")
    assert not conn.connected, "a failed AUTH closes the connection"
    conn = RedisConnection(RedisAddress.from_url(f"redis://127.0.0.1:{secured.port}/0"), 1.0)
    with pytest.raises(RedisReplyError, match="NOAUTH"):
        conn.command("GET", "k")
    conn.close()
    store = RedisStore(f"redis://:wrong@127.0.0.1:{secured.port}/0")
    with pytest.raises(StoreUnavailable, match="redis store"):
        store.get("k")
    store.close()


@pytest.mark.redis
def test_unix_socket(secured: RedisServer) -> None:
    assert secured.socket_path is not None
    store = RedisStore(f"unix://{secured.socket_path}?password=t0ps3cret&db=5")
    store.set("via", "unix")
    assert store.get_many(["via"]) == ["unix"]
    store.close()


def _serve_once(reply: bytes) -> tuple[int, threading.Thread]:
    """A server that reads one command, answers ``reply`` and closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        if reply:
            conn.sendall(reply)
        conn.close()
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize(("reply", "message"), [
    (b"", "closed by the server"),
    (b"$5\r\nab", "closed by the server"),
    (b"?garbage\r\n", "protocol error"),
])
def test_broken_servers(reply: bytes, message: str) -> None:
    port, thread = _serve_once(reply)
    conn = RedisConnection(RedisAddress(port=port), 1.0)
    with pytest.raises(RedisError, match=message):
        conn.command("GET", "k")
    assert not conn.connected
    thread.join(timeout=5)


def test_silent_server_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    conn = RedisConnection(RedisAddress(port=listener.getsockname()[1]), 0.2)
    started = time.monotonic()
    with pytest.raises(RedisError):
        conn.command("PING")
    assert time.monotonic() - started < 2
    listener.close()


def test_nothing_listening() -> None:
    conn = RedisConnection(RedisAddress(port=free_port()), 0.5)
    with pytest.raises(RedisError, match="cannot connect"):
        conn.command("PING")
