"""Redis with Sentinel on loopback for tests: one primary, one replica, three Sentinels.

Every process is a ``redis-server`` started here (``--sentinel`` for the Sentinels) in
its own directory and stopped by its PID. :meth:`SentinelCluster.kill_primary` ends the
primary with SIGKILL, the way a crashed node goes. The Sentinels then agree that it is
down (``down_after_ms``) and promote the replica. With ``relay=True`` the Sentinels know
the primary by a :class:`TcpRelay` in front of it. A test can then cut one command's
reply after the primary has applied it (:meth:`TcpRelay.cut_reply_of`).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from harness.ports import free_port
from harness.process import TestDaemon, file_tail

__all__ = ["REDIS_SERVER", "RedisNode", "SentinelCluster", "SentinelNode", "TcpRelay", "missing_sentinel"]

REDIS_SERVER = shutil.which("redis-server")
SERVICE = "mymaster"


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
                       decode_responses=True)


def _answers(port: int) -> bool:
    try:
        with _client(port) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


class RedisNode(TestDaemon):
    """One ``redis-server`` (without persistence), optionally a replica of ``primary_port``."""

    name = "redis-server"
    stop_timeout = 5.0

    def __init__(self, directory: Path, *, primary_port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.primary_port = primary_port

    def start(self) -> RedisNode:
        """Start and wait until it answers PING."""
        replica = ["--replicaof", "127.0.0.1", str(self.primary_port)] if self.primary_port else []
        # No diskless-sync delay: the replica syncs at once instead of after 5 s.
        self.launch([str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", str(self.dir),
                     *replica],
                    self.dir / "redis.log", lambda: _answers(self.port), timeout=10)
        return self

    def kill(self) -> None:
        """SIGKILL by PID: the node is gone at once, as after a crash."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        return file_tail(self.dir / "redis.log", lines)


class SentinelNode(TestDaemon):
    """One Sentinel (``redis-server sentinel.conf --sentinel``) watching ``SERVICE``."""

    name = "redis-sentinel"
    stop_timeout = 5.0

    def __init__(self, directory: Path, index: int) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.myid = f"{index + 1:040x}"

    def configure(self, primary_port: int, replica_port: int, peers: list[SentinelNode], *,
                  down_after_ms: int, failover_timeout_ms: int) -> None:
        """Write sentinel.conf. The replica and the peers are listed as known, so no
        discovery round (peers say hello every 2 s, INFO every 10 s) is waited for."""
        known = "".join(f"sentinel known-sentinel {SERVICE} 127.0.0.1 {p.port} {p.myid}\n"
                        for p in peers if p is not self)
        # Sentinel rewrites its file (what it learns about replicas and peers).
        (self.dir / "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"sentinel myid {self.myid}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            f"sentinel known-replica {SERVICE} 127.0.0.1 {replica_port}\n{known}",
            encoding="utf-8")

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` as ``[store] sentinels`` lists it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> SentinelNode:
        """Start and wait until it answers PING."""
        self.launch([str(REDIS_SERVER), str(self.dir / "sentinel.conf"), "--sentinel"],
                    self.dir / "sentinel.log", lambda: _answers(self.port), timeout=10)
        return self

    def primary(self) -> dict[str, str]:
        """What this Sentinel says about the primary (``SENTINEL MASTER``), as strings."""
        with _client(self.port) as client:
            reply = client.execute_command("SENTINEL", "MASTER", SERVICE)
        if isinstance(reply, dict):
            return {str(k): str(v) for k, v in reply.items()}
        return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}

    def log_tail(self, lines: int = 20) -> str:
        return file_tail(self.dir / "sentinel.log", lines)


class TcpRelay:
    """A loopback TCP forwarder to ``127.0.0.1:target_port`` (threads, both directions).

    ``cut_reply_of(marker)``: the next client command containing ``marker`` is forwarded,
    its reply is withheld, and after ``hold`` seconds both sides of that connection are
    closed. The server has run the command; the client never learns it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._marker: bytes | None = None
        self._hold = 0.0
        self._lock = threading.Lock()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_reply_of(self, marker: bytes, hold: float = 0.3) -> None:
        """Withhold the reply to the next command containing ``marker`` (once)."""
        with self._lock:
            self._marker, self._hold = marker, hold
        self.cut.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            muted = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, muted, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, muted, False), daemon=True).start()

    def _take_marker(self, data: bytes) -> float | None:
        with self._lock:
            if self._marker is None or self._marker not in data:
                return None
            self._marker = None
            return self._hold

    def _pump(self, src: socket.socket, dst: socket.socket, muted: threading.Event, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                hold = self._take_marker(data) if upstream else None
                if hold is not None:
                    muted.set()
                    dst.sendall(data)
                    time.sleep(hold)
                    self.cut.set()
                    break
                if not muted.is_set():
                    dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Stop accepting (open connections end with their peers)."""
        self.listener.close()


class SentinelCluster:
    """A primary, a replica and three Sentinels on loopback; a context manager.

    ``down_after_ms`` and ``failover_timeout_ms`` are the Sentinels' settings of the same
    names. ``start()`` returns once every Sentinel knows the replica and both other
    Sentinels, so that a failover can happen.
    """

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 relay: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mw-sentinel-"))
        self.primary = RedisNode(self.dir / "primary")
        self.relay = TcpRelay(self.primary.port) if relay else None
        self.monitored_port = self.relay.port if self.relay else self.primary.port
        self.replica = RedisNode(self.dir / "replica", primary_port=self.monitored_port)
        self.sentinels = [SentinelNode(self.dir / f"sentinel{i}", i) for i in range(3)]
        for sentinel in self.sentinels:
            sentinel.configure(self.monitored_port, self.replica.port, self.sentinels,
                               down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)

    @property
    def addresses(self) -> list[str]:
        """The Sentinels as ``[store] sentinels`` lists them."""
        return [s.address for s in self.sentinels]

    @property
    def url(self) -> str:
        """The ``redis_url`` to give with the Sentinels (database 0, no password)."""
        return "redis://127.0.0.1/0"

    def start(self, timeout: float = 20.0) -> SentinelCluster:
        """Start every process and wait until the Sentinels know each other and the replica."""
        try:
            self.primary.start()
            self.replica.start()
            self._wait(self._replica_linked, timeout, "the replica did not sync")
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait(self._sentinels_ready, timeout, "the Sentinels did not find each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_linked(self) -> bool:
        with _client(self.replica.port) as client:
            info: dict[str, object] = client.info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        try:
            views = [s.primary() for s in self.sentinels]
        except redis.RedisError:
            return False
        return all(v.get("num-slaves") == "1" and v.get("num-other-sentinels") == "2" for v in views)

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s.dir.name}\n{s.log_tail(8)}" for s in self.sentinels)
                raise RuntimeError(f"{what} within {timeout:g} s\n{logs}")
            time.sleep(0.1)

    def primary_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                return int(sentinel.primary()["port"])
            except (redis.RedisError, KeyError):
                continue
        return None

    def kill_primary(self) -> None:
        """SIGKILL the primary by its PID."""
        self.primary.kill()

    def wait_failover(self, timeout: float = 15.0) -> float:
        """Wait until every Sentinel names the replica as primary; the seconds it took."""
        started = time.monotonic()
        self._wait(lambda: all(_names(s, self.replica.port) for s in self.sentinels), timeout,
                   "no failover to the replica")
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every process by its PID and remove the directory."""
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()
        if self.relay is not None:
            self.relay.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _names(sentinel: SentinelNode, port: int) -> bool:
    try:
        return sentinel.primary().get("port") == str(port)
    except redis.RedisError:
        return False


def missing_sentinel() -> str | None:
    """Why the Sentinel tests cannot run here (None: they can)."""
    if REDIS_SERVER is None:
        return "redis-server not installed"
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=False).stdout
    return None if "Redis server" in out else f"{REDIS_SERVER} is not a Redis server"
