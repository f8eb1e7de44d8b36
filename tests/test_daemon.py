"""The daemon runner shared by the policy daemon and the milter: workers, sockets, idle sweeps."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from mailwarden.daemon import IdleSweeper, run_loop, supervise
from mailwarden.endpoint import Endpoint, EndpointError


def test_sigterm_while_a_crashed_worker_waits_to_be_replaced_starts_no_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that died at once is replaced after a pause; SIGTERM in that pause ends it all."""
    handlers: dict[int, object] = {}
    forked: list[int] = []
    killed: list[tuple[int, int]] = []
    exits = iter([(1001, 256), (1002, 0)])

    def fake_fork() -> int:
        pid = 1001 + len(forked)
        forked.append(pid)
        return pid

    def fake_wait() -> tuple[int, int]:
        try:
            return next(exits)
        except StopIteration:
            raise ChildProcessError from None

    def sigterm_during_pause(_seconds: float) -> None:
        handler = handlers[signal.SIGTERM]
        assert callable(handler)
        handler(signal.SIGTERM, None)

    monkeypatch.setattr("mailwarden.daemon.os.fork", fake_fork)
    monkeypatch.setattr("mailwarden.daemon.os.wait", fake_wait)
    monkeypatch.setattr("mailwarden.daemon.os.kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr("mailwarden.daemon.signal.signal", handlers.__setitem__)
    monkeypatch.setattr("mailwarden.daemon.time.sleep", sigterm_during_pause)
    assert supervise(2, lambda: 0, name="test") == 0
    assert forked == [1001, 1002], "no worker started after SIGTERM"
    assert killed == [(1002, signal.SIGTERM)]


def test_one_worker_runs_in_this_process() -> None:
    assert supervise(1, lambda: 7, name="test") == 7


def test_the_loop_runs_blocking_work_in_its_one_pool() -> None:
    names: list[str] = []

    async def main() -> None:
        names.append(await asyncio.get_running_loop().run_in_executor(
            None, lambda: threading.current_thread().name))

    run_loop(main(), "asyncio", threads=2, name="pooltest")
    run_loop(main(), "uvloop", threads=2, name="pooltest")
    assert len(names) == 2 and all(n.startswith("pooltest") for n in names)


class Conn:
    def __init__(self, since: float | None) -> None:
        self.since = since
        self.dropped = ""

    @property
    def idle_since(self) -> float | None:
        return self.since

    def drop(self, reason: str) -> None:
        self.dropped = reason


def test_idle_sweeper_closes_only_silent_connections_not_busy_ones() -> None:
    now = time.monotonic()
    silent, recent, busy = Conn(now - 100), Conn(now - 1), Conn(None)
    reported: list[object] = []
    sweeper = IdleSweeper([silent, recent, busy], 30, peer="MTA", report=reported.extend)
    assert sweeper.sweep(now) == [silent] and reported == [silent]
    assert silent.dropped == "MTA silent for over 30s" and not recent.dropped and not busy.dropped


@pytest.mark.parametrize(("spec", "text"), [
    ("unix:/run/x.sock", "unix:/run/x.sock"), ("inet:127.0.0.1:10025", "inet:127.0.0.1:10025"),
    ("inet:[::1]:783", "inet:[::1]:783"),
])
def test_endpoints_parse_and_print_back(spec: str, text: str) -> None:
    assert str(Endpoint.parse(spec)) == text


@pytest.mark.parametrize("spec", ["unix:relative.sock", "inet:host", "inet::25", "inet:h:0", "tcp:1",
                                  "/run/x.sock", "inet:h:65536"])
def test_bad_endpoints_say_what_is_expected(spec: str) -> None:
    with pytest.raises(EndpointError, match=r"expected|absolute"):
        Endpoint.parse(spec)


def test_bind_replaces_a_stale_socket_but_never_a_live_one_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    live = Endpoint.parse(f"unix:{path}").bind(mode=0o600)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(OSError, match="another process is listening"):
        Endpoint.parse(f"unix:{path}").bind()
    live.close()
    (tmp_path / "plain").write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        Endpoint.parse(f"unix:{tmp_path}/plain").bind()
    assert (tmp_path / "plain").read_text() == "keep me"


def test_bind_inet_names_the_endpoint_on_failure() -> None:
    # An address this machine does not have: bind fails at once, nothing is sent.
    with pytest.raises(OSError, match=r"inet:192\.0\.2\.1:2525"):
        Endpoint.parse("inet:192.0.2.1:2525").bind()
