"""The clamd and spamd adapters against the real daemons and against fake ones."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.clamd import EICAR, ClamdServer, FakeClamd
from harness.ports import free_port
from harness.smtpsink import SmtpSink
from harness.spamd import GTUBE, FakeSpamd, SpamdServer
from milters.reinject import InjectError, Origin, SmtpInjector, dot_stuff, xtext
from milters.scanners import ScanError, SpamResult, VirusResult
from milters.scanners.clamd import ClamdScanner
from milters.scanners.spamd import SpamdScanner
from milters.scanners.upstreams import DeadlineExceeded, Upstreams, remaining
from tests.milter.test_message import zip_of

TESTFILES = Path("/usr/share/clamav-testfiles")


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def scan(scanner: ClamdScanner, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
    """One scan on a fresh event loop (its clamd sessions end with it)."""
    async def run() -> VirusResult:
        try:
            return await scanner.scan(stream, deadline)
        finally:
            scanner.close()

    return asyncio.run(run())


def check(scanner: SpamdScanner, message: bytes, deadline: float) -> SpamResult:
    """One spamd check on a fresh event loop."""
    return asyncio.run(scanner.check(message, deadline))


def mail_with(data: bytes, filename: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@remote.example"
    msg["Subject"] = "x"
    msg.set_content("see attachment")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    return msg.as_bytes()


# ---------------------------------------------------------------- clamd


@pytest.mark.parametrize("kind", ["unix", "inet"])
@pytest.mark.parametrize(("payload", "expected"), [
    pytest.param(b"Subject: x\r\n\r\n" + EICAR + b"\r\n", True, id="plain-body"),
    pytest.param(mail_with(EICAR, "eicar.txt"), True, id="base64-attachment"),
    pytest.param(mail_with(zip_of({"inner.zip": zip_of({"e.txt": EICAR})}), "outer.zip"), True,
                 id="zip-in-zip"),
    pytest.param(b"Subject: x\r\n\r\nnothing to see\r\n", False, id="clean"),
])
def test_real_clamd_finds_eicar_wherever_it_hides(clamd: ClamdServer, kind: str, payload: bytes,
                                                  expected: bool) -> None:
    address = clamd.unix_address if kind == "unix" else clamd.inet_address
    result = scan(ClamdScanner([address]), lambda: [payload], soon())
    assert result.infected is expected
    if expected:
        assert result.signature.startswith("Custom.Test.EICAR")


@pytest.mark.skipif(not TESTFILES.is_dir(), reason="clamav-testfiles not installed")
@pytest.mark.parametrize("name", ["clam.zip", "clam.tar.gz", "clam.7z", "clam.cab"])
def test_real_clamd_unpacks_the_clamav_test_archives(clamd: ClamdServer, name: str) -> None:
    data = mail_with((TESTFILES / name).read_bytes(), name)
    result = scan(ClamdScanner([clamd.unix_address]), lambda: [data], soon())
    assert result.infected and "ClamAV-TestFile" in result.signature


def test_stream_longer_than_clamd_accepts_is_an_error_not_clean(tmp_path: Path) -> None:
    with ClamdServer(stream_max="1M") as small:
        scanner = ClamdScanner([small.unix_address])
        with pytest.raises(ScanError, match="size limit"):
            scan(scanner, lambda: [b"x" * (2 << 20)], soon())


def test_dead_first_upstream_fails_over_and_is_skipped_next_time(clamd: ClamdServer,
                                                                tmp_path: Path) -> None:
    scanner = ClamdScanner([f"unix:{tmp_path}/gone.sock", clamd.unix_address], retry_after=60)
    assert scan(scanner, lambda: [EICAR], soon()).upstream == clamd.unix_address
    assert str(scanner.upstreams.order()[0]) == clamd.unix_address


def test_all_upstreams_dead_is_a_scan_error(tmp_path: Path) -> None:
    scanner = ClamdScanner([f"unix:{tmp_path}/a.sock", f"unix:{tmp_path}/b.sock"])
    with pytest.raises(ScanError, match=r"a\.sock.*b\.sock"):
        scan(scanner, lambda: [b"x"], soon())


def test_loop_scans_share_one_clamd_session(clamd: ClamdServer) -> None:
    """On the event loop, scans go over one IDSESSION connection kept open between them."""
    scanner = ClamdScanner([clamd.unix_address])
    nested = mail_with(zip_of({"inner.zip": zip_of({"e.txt": EICAR})}), "outer.zip")

    async def scans() -> list[VirusResult]:
        return [await scanner.scan(lambda d=data: [d], soon())  # type: ignore[misc]
                for data in (EICAR, b"Subject: x\r\n\r\nclean\r\n", nested, b"clean again")]

    results = asyncio.run(scans())
    assert [r.infected for r in results] == [True, False, True, False]
    assert scanner.sessions.opened == 1
    scanner.sessions.close()


def test_session_clamd_ended_while_idle_is_replaced_at_once() -> None:
    """A real clamd ends a session idle past its ReadTimeout: the next scan opens a new one."""
    with ClamdServer(read_timeout=1) as short:
        scanner = ClamdScanner([short.unix_address], retry_after=60)

        async def scans() -> list[VirusResult]:
            first = await scanner.scan(lambda: [EICAR], soon())
            await asyncio.sleep(2.5)
            return [first, await scanner.scan(lambda: [EICAR], soon())]

        assert [r.infected for r in asyncio.run(scans())] == [True, True]
        assert scanner.sessions.opened == 2
        assert str(scanner.upstreams.order()[0]) == short.unix_address, "not counted as a failure"
        scanner.sessions.close()


def test_session_ended_as_it_is_used_is_retried_once_on_a_new_one() -> None:
    with FakeClamd() as fake:
        fake.end_sessions = True  # a session ends, unanswered, when its second command arrives
        scanner = ClamdScanner([fake.address], retry_after=60)

        async def scans() -> list[VirusResult]:
            return [await scanner.scan(lambda: [b"x"], soon()) for _ in range(3)]

        assert [r.infected for r in asyncio.run(scans())] == [False, False, False]
        assert fake.scans == 3 and fake.sessions == 3 and scanner.sessions.opened == 3
        scanner.sessions.close()


def test_a_session_that_timed_out_is_not_used_again() -> None:
    with FakeClamd(mode="hang") as fake:
        scanner = ClamdScanner([fake.address], timeout=0.5)

        async def scans() -> VirusResult:
            with pytest.raises(ScanError, match="timed out"):
                await scanner.scan(lambda: [b"x"], soon())
            fake.mode = "ok"
            return await scanner.scan(lambda: [EICAR], soon())

        assert asyncio.run(scans()).infected
        assert scanner.sessions.opened == 2
        scanner.sessions.close()


@pytest.mark.parametrize("mode", ["hang", "garbage"])
def test_hanging_or_babbling_clamd_is_a_scan_error_within_the_timeout(mode: str) -> None:
    with FakeClamd(mode=mode) as fake:
        started = time.monotonic()
        with pytest.raises(ScanError):
            scan(ClamdScanner([fake.address], timeout=0.5), lambda: [b"x"], soon())
        assert time.monotonic() - started < 2


def test_deadline_caps_the_scan_timeout() -> None:
    with FakeClamd(mode="hang") as fake:
        started = time.monotonic()
        with pytest.raises(ScanError):
            scan(ClamdScanner([fake.address], timeout=60), lambda: [b"x"], soon(0.5))
        assert time.monotonic() - started < 2


def test_no_time_left_is_a_deadline_error() -> None:
    assert 4 < remaining(time.monotonic() + 5, 30) <= 5
    assert remaining(time.monotonic() + 100, 30) == 30
    with pytest.raises(DeadlineExceeded):
        remaining(time.monotonic(), 30)


def test_failed_upstreams_are_retried_after_the_pause() -> None:
    now = [0.0]
    ups = Upstreams(["unix:/a", "unix:/b"], retry_after=30, clock=lambda: now[0])
    ups.failed(ups.endpoints[0])
    assert [str(e) for e in ups.order()] == ["unix:/b", "unix:/a"]
    now[0] = 31
    assert [str(e) for e in ups.order()] == ["unix:/a", "unix:/b"]


# ---------------------------------------------------------------- spamd


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_real_spamd_scores_gtube_and_lists_symbols(spamd: SpamdServer, over: str) -> None:
    msg = f"From: a@remote.example\r\nSubject: x\r\n\r\n{GTUBE}\r\n".encode()
    address = spamd.address if over == "tcp" else spamd.unix_address
    result = check(SpamdScanner([address]), msg, soon(30))
    assert result.score >= 1000 and "GTUBE" in result.symbols
    assert result.upstream == address


def test_real_spamd_scores_ham_low(spamd: SpamdServer) -> None:
    msg = (b"From: a@remote.example\r\nTo: b@example.jp\r\nSubject: lunch\r\nDate: Mon, 23 Nov 2026 "
           b"10:00:00 +0900\r\nMessage-ID: <lunch-1@remote.example>\r\n\r\nLunch at noon?\r\n")
    assert check(SpamdScanner([spamd.unix_address]), msg, soon(30)).score < 5


@pytest.mark.parametrize("mode", ["hang", "error"])
def test_hanging_or_failing_spamd_is_a_scan_error(mode: str) -> None:
    with FakeSpamd(mode=mode) as fake:
        started = time.monotonic()
        with pytest.raises(ScanError, match="timed out" if mode == "hang" else "spamd"):
            check(SpamdScanner([fake.address], timeout=0.5), b"x", soon())
        assert time.monotonic() - started < 2


def test_deadline_caps_the_spamd_timeout() -> None:
    with FakeSpamd(mode="hang") as fake:
        started = time.monotonic()
        with pytest.raises(ScanError):
            check(SpamdScanner([fake.address], timeout=30), b"x", soon(0.4))
        assert time.monotonic() - started < 1.5


def test_spamd_fails_over(tmp_path: Path) -> None:
    with FakeSpamd(score=2.5) as fake:
        scanner = SpamdScanner([f"unix:{tmp_path}/none.sock", fake.address])
        result = check(scanner, b"x", soon())
        assert result.score == 2.5 and result.upstream == fake.address
        assert str(scanner.upstreams.order()[0]) == fake.address, "the dead one rests"


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.0 200 OK\r\n\r\n", b"SPAMD/1.1 0 EX_OK\r\n\r\n",
                                   b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; lots / 5\r\n\r\n"])
def test_nonsense_or_headless_spamd_reply_is_a_scan_error(reply: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        server = threading.Thread(target=answer, daemon=True)
        server.start()
        address = f"inet:127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ScanError, match="spamd"):
            check(SpamdScanner([address]), b"x", soon())
        server.join(5)


# ---------------------------------------------------------------- re-injection


def test_reinjection_streams_dot_stuffed_chunks() -> None:
    with SmtpSink() as sink:
        injector = SmtpInjector(f"inet:127.0.0.1:{sink.port}")
        data = [b"Subject: dots\r\n\r\n.leading dot\r\n", b".at chunk start\r\nend"]
        injector.send("", [("a@example.jp", ())], data, deadline=soon(), origin=Origin("192.0.2.1"))
        (msg,) = sink.wait_for(1)
        assert msg.envelope_sender == "" and msg.recipients == ("a@example.jp",)
        assert b"\r\n.leading dot\r\n.at chunk start\r\nend" in msg.data


def test_refused_reinjection_raises() -> None:
    with SmtpSink(reject_recipients={"a@example.jp": "550 5.1.1 no"}) as sink:
        injector = SmtpInjector(f"inet:127.0.0.1:{sink.port}")
        with pytest.raises(InjectError, match="550"):
            injector.send("s@x", [("a@example.jp", ())], [b"Subject: x\r\n\r\nx\r\n"], deadline=soon())


def test_unreachable_reinjection_raises(tmp_path: Path) -> None:
    with pytest.raises(InjectError):
        SmtpInjector(f"inet:127.0.0.1:{free_port()}").send("s@x", [("a@b", ())], [b"x"], deadline=soon())


def test_dot_stuffing_and_xtext() -> None:
    assert dot_stuff(b".a\r\n.b", at_line_start=True) == b"..a\r\n..b"
    assert dot_stuff(b".a", at_line_start=False) == b".a"
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
