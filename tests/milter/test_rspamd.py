"""rspamd as the spam engine (``milter.spam_engine = "rspamd"``).

Against a real rspamd (Debian's package, network checks off, its resolver the stub
DNS): the client and its protocol headers, one request per message, the milter's
per-recipient outcomes on rspamd's score, rspamd stopped, the selftest row, and the
two engines' verdicts on one corpus side by side.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.clamd import EICAR, ClamdServer, FakeClamd
from harness.dnsstub import StubDns
from harness.fakes import FakeDirectory
from harness.rspamd import RSPAMD, RspamdServer
from harness.slapd import SlapdServer
from harness.smtpsink import SmtpSink
from harness.spamd import GTUBE, SpamdServer
from mailwarden.config import Config
from mailwarden.policy import PolicyResolver
from mailwarden.selftest import ProbeFailed
from mailwarden.store import MemoryStore
from milters import protocol
from milters.config import MilterConfig, check_milter_config
from milters.scanners import ScanError, SpamQuery, SpamResult
from milters.scanners.rspamd import SKIP_AUTH_SETTINGS, RspamdScanner, parse_reply, request_headers
from milters.scanners.spamd import SpamdScanner
from milters.selftest import _rspamd
from milters.service import MilterService, build_service, spam_engine
from tests.milter.helpers import (
    FakeVirusScanner,
    Fed,
    RecordingInjector,
    drive,
    make_message,
    milter_config,
    sample_directory,
)

pytestmark = pytest.mark.skipif(RSPAMD is None, reason="rspamd not installed")

CLIENT_IP = "192.0.2.10"
"""The client the milter tests' ``drive`` connects from (not one of rspamd's local networks)."""


@pytest.fixture(scope="module")
def dns() -> Iterator[StubDns]:
    with StubDns({"remote.example": {"A": ["192.0.2.10"], "MX": ["10 mx.remote.example."]},
                  "mx.remote.example": {"A": ["192.0.2.10"]},
                  "client.example": {"A": ["192.0.2.10"]},
                  "10.2.0.192.in-addr.arpa": {"PTR": ["client.example."]}}) as stub:
        yield stub


@pytest.fixture(scope="module")
def rspamd(dns: StubDns) -> Iterator[RspamdServer]:
    server = RspamdServer(dns.port).start()
    yield server
    server.cleanup()


def check(scanner: RspamdScanner, message: bytes, query: SpamQuery | None = None,
          seconds: float = 20.0) -> SpamResult:
    """One check on a fresh event loop, its connections closed after."""
    async def run() -> SpamResult:
        try:
            return await scanner.check(message, time.monotonic() + seconds, query)
        finally:
            await scanner.close()

    return asyncio.run(run())


def ham(subject: str = "lunch on friday") -> bytes:
    msg = make_message("Hi Taro,\n\nare we still on for lunch on Friday? The usual place at noon.\n\n"
                       "Regards,\nJiro\n", subject=subject, sender="jiro@remote.example")
    msg["Date"] = "Mon, 07 Dec 2026 01:00:00 +0000"
    return msg.as_bytes()


def gtube() -> bytes:
    msg = make_message(f"hello\n{GTUBE}\n", sender="jiro@remote.example")
    msg["Date"] = "Mon, 07 Dec 2026 01:00:00 +0000"
    return msg.as_bytes()


def log_lines(server: RspamdServer, marker: str, count: int = 1, timeout: float = 10.0) -> list[str]:
    """rspamd's task log lines naming ``marker`` (it writes them after the reply)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in (server.dir / "rspamd.log").read_text(errors="replace").splitlines()
                 if "rspamd_task_write_log" in line and marker in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# ---------------------------------------------------------------- the protocol, without rspamd


def test_request_headers_carry_the_envelope_one_rcpt_each() -> None:
    query = SpamQuery(sender="", recipients=("a@example.jp", "b@example.com"), client_address="192.0.2.1",
                      client_name="unknown", helo="mx.remote.example", auth_user="taro",
                      queue_id="4XyZ", receiver="mx.example.jp", sender_auth_done=True)
    pairs = request_headers(query, skip_auth=True)
    headers = dict(pairs)
    assert headers["From"] == "<>"
    assert [v for n, v in pairs if n == "Rcpt"] == ["a@example.jp", "b@example.com"]
    assert (headers["IP"], headers["Helo"], headers["User"], headers["Queue-Id"], headers["MTA-Name"]) == (
        "192.0.2.1", "mx.remote.example", "taro", "4XyZ", "mx.example.jp")
    assert "Hostname" not in headers  # Postfix's "unknown" is no host name
    assert json.loads(headers["Settings"]) == {"groups_disabled": ["antivirus", "policies"]}
    antivirus_off = {"groups_disabled": ["antivirus"]}
    assert json.loads(dict(request_headers(query, skip_auth=False))["Settings"]) == antivirus_off
    named = dict(request_headers(SpamQuery(sender="x@remote.example", client_name="client.example"),
                                 skip_auth=True))
    assert named["Hostname"] == "client.example" and json.loads(named["Settings"]) == antivirus_off
    assert [n for n, _ in request_headers(None, skip_auth=True)] == ["Settings"]
    # A line break in an address would start a header field of its own: the address is left out.
    assert "From" not in dict(request_headers(SpamQuery(sender="x@remote.example\r\nSettings: {}"),
                                              skip_auth=True))


@pytest.mark.parametrize("reply", [
    {"error": "bad request"}, {"score": "high"}, {"score": float("nan")}, {"action": "reject"},
    {"score": 1.0, "symbols": ["A"]}, {"score": True},
])
def test_a_reply_without_a_usable_score_is_refused(reply: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_reply(reply)


def test_symbols_come_weightiest_first() -> None:
    score, symbols, action = parse_reply({"score": 7.5, "action": "add header", "symbols": {
        "SMALL": {"score": 0.5}, "NONE": {"score": 0.0}, "BIG": {"score": 6.0}, "NEG": {"score": -1.0}}})
    assert (score, symbols, action) == (7.5, ("BIG", "NEG", "SMALL", "NONE"), "add header")


def test_spam_engine_picks_the_client(tmp_path: Path) -> None:
    assert isinstance(spam_engine(MilterConfig.of(milter_config(tmp_path))), SpamdScanner)
    cfg = milter_config(tmp_path, 'spam_engine = "rspamd"\n'
                                  'rspamd = ["inet:127.0.0.1:11333", "unix:/run/r.sock"]')
    scanner = spam_engine(MilterConfig.of(cfg))
    assert isinstance(scanner, RspamdScanner)
    assert [str(e) for e in scanner.upstreams.endpoints] == ["inet:127.0.0.1:11333", "unix:/run/r.sock"]


def test_config_check_names_a_wrong_engine_and_a_bad_upstream(tmp_path: Path) -> None:
    m = MilterConfig.of(milter_config(tmp_path, 'spam_engine = "bogofilter"\nrspamd = ["http://x"]'))
    problems = check_milter_config(m, 1.0)
    assert any(p.startswith("milter.spam_engine: 'bogofilter'") for p in problems)
    assert any(p.startswith("milter.rspamd[0]:") for p in problems)
    empty = MilterConfig.of(milter_config(tmp_path, 'spam_engine = "rspamd"\nrspamd = []'))
    assert "milter.rspamd: at least one upstream is needed" in check_milter_config(empty, 1.0)


def test_a_silent_rspamd_is_a_scan_error_within_the_timeout() -> None:
    server = ScriptedHttp(None)
    try:
        started = time.monotonic()
        with pytest.raises(ScanError, match="timed out"):
            check(RspamdScanner([f"inet:127.0.0.1:{server.port}"], timeout=0.5), b"Subject: x\r\n\r\nx\r\n")
        assert time.monotonic() - started < 3
    finally:
        server.close()


class ScriptedHttp:
    """Answers each connection with ``reply`` once the request is in (its head and the
    ``Content-Length`` bytes of body), then closes unless ``hold``; keeps the requests.
    Without a reply it accepts connections and never answers (an rspamd wedged on a
    message)."""

    def __init__(self, reply: bytes | None, *, hold: bool = False) -> None:
        self.reply, self.hold = reply, hold or reply is None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                conn = self.sock.accept()[0]
                if self.reply is None:
                    self.held.append(conn)
                    continue
                data = b""
                while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                        re.search(rb"Content-Length: (\d+)", data).group(1)):  # type: ignore[union-attr]
                    data += conn.recv(65536)
                self.requests.append(data)
                conn.sendall(self.reply)
                if self.hold:
                    self.held.append(conn)
                else:
                    conn.close()
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


REPLY = b'{"score": 3.5, "action": "no action", "symbols": {"A": {"score": 3.5}}}'


@pytest.mark.parametrize(("reply", "hold", "found"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY), True, "3.5"),
    (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + REPLY, False, "3.5"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n", False,
     "Transfer-Encoding 'chunked'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + REPLY, False, "before the end of its reply"),
    (b"", False, "without a reply"),
    (b"HTTP/1.1 500 Internal\r\nContent-Length: 6\r\n\r\nbroken", False, "HTTP 500: broken"),
    (b"SPAMD/1.1 0 EX_OK\r\n\r\n", False, "not an HTTP reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", False, "bad Content-Length"),
])
def test_replies_are_read_to_their_length_and_anything_else_is_a_scan_error(
        reply: bytes, hold: bool, found: str) -> None:
    server = ScriptedHttp(reply, hold=hold)
    query = SpamQuery(sender="jiro@remote.example", recipients=("a@example.jp", "b@example.jp"),
                      queue_id="SCRIPT1")
    message = b"Subject: x\r\n\r\nbody\r\n"
    scanner = RspamdScanner([f"inet:127.0.0.1:{server.port}"], timeout=5.0)
    try:
        if found == "3.5":
            assert check(scanner, message, query).score == 3.5
        else:
            with pytest.raises(ScanError, match=re.escape(found)):
                check(scanner, message, query)
    finally:
        server.close()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /checkv2 HTTP/1.1" and body == message
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Content-Length: %d" % len(message) in lines
    assert [line for line in lines if line.startswith(b"Rcpt: ")] == [b"Rcpt: a@example.jp",
                                                                      b"Rcpt: b@example.jp"]


# ---------------------------------------------------------------- the client against rspamd


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_real_rspamd_scores_gtube_as_its_reject_score_and_ham_low(rspamd: RspamdServer, over: str) -> None:
    address = rspamd.address if over == "tcp" else rspamd.unix_address
    scanner = RspamdScanner([address])
    spam = check(scanner, gtube())
    assert "GTUBE" in spam.symbols and spam.score >= 15.0
    assert spam.upstream == address
    clean = check(scanner, ham(), SpamQuery(sender="jiro@remote.example", recipients=("taro@example.jp",),
                                            client_address=CLIENT_IP, client_name="client.example",
                                            helo="client.example"))
    assert clean.score < 5.0 and clean.symbols


def test_rspamd_closes_the_connection_after_each_reply_even_when_asked_to_keep_it(
        rspamd: RspamdServer) -> None:
    """What the client is built on: nothing to keep between requests (rspamd 3.4)."""
    message = ham()
    request = (b"POST /checkv2 HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(message), message))
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(rspamd.socket_path))
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head.split(b"\r\n")
    assert json.loads(body)["score"] is not None  # the whole reply, then the end of the stream


def test_envelope_reaches_rspamd_in_one_request_for_all_recipients(rspamd: RspamdServer) -> None:
    query = SpamQuery(sender="jiro@remote.example", recipients=("taro@example.jp", "bob@example.com"),
                      client_address=CLIENT_IP, helo="client.example", auth_user="jiro",
                      queue_id="RSPQ1", receiver="mx.example.jp")
    check(RspamdScanner([rspamd.address]), ham(), query)
    (line,) = log_lines(rspamd, "qid: <RSPQ1>")
    assert f"ip: {CLIENT_IP}" in line and "from: <jiro@remote.example>" in line
    assert "user: jiro" in line
    assert "rcpts: <taro@example.jp,bob@example.com>" in line


def test_rspamds_own_sender_checks_are_off_where_mailwarden_did_them(rspamd: RspamdServer) -> None:
    query = SpamQuery(sender="jiro@remote.example", recipients=("taro@example.jp",),
                      client_address=CLIENT_IP, helo="client.example")
    scanner = RspamdScanner([rspamd.address])
    own = check(scanner, ham(), query)
    assert any(s.startswith(("R_SPF_", "DMARC_")) for s in own.symbols), own.symbols
    done = SpamQuery(**{**query.__dict__, "sender_auth_done": True})
    skipped = check(scanner, ham(), done)
    assert not any(s.startswith(("R_SPF_", "R_DKIM_", "DMARC_", "ARC_")) for s in skipped.symbols)
    # Asked to, rspamd runs them anyway.
    assert any(s.startswith("R_SPF_") for s in check(RspamdScanner([rspamd.address], skip_auth=False),
                                                      ham(), done).symbols)
    assert SKIP_AUTH_SETTINGS


def test_rspamds_antivirus_module_never_scans_mailwardens_requests(dns: StubDns) -> None:
    """An rspamd with its antivirus module pointed at clamd finds EICAR in a plain request
    but leaves mailwarden's alone: the virus scan is mailwarden's own, done once."""
    clamd = ClamdServer().start()
    clamd.dir.chmod(0o755)  # rspamd runs as its own user
    clamd.socket_path.chmod(0o666)
    server = RspamdServer(dns.port, clamd=str(clamd.socket_path)).start()
    try:
        msg = make_message(f"see attached\n{EICAR.decode()}\n", sender="jiro@remote.example").as_bytes()
        request = urllib.request.Request(f"{server.url}/checkv2", data=msg, method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert "CLAM_VIRUS" in json.loads(reply.read())["symbols"]
        assert not any(s.startswith("CLAM_") for s in check(RspamdScanner([server.address]), msg).symbols)
        assert "CLAM_VIRUS" not in check(RspamdScanner([server.address], skip_auth=False), msg,
                                         SpamQuery(sender="jiro@remote.example")).symbols
    finally:
        server.cleanup()
        clamd.cleanup()


def test_a_dead_first_upstream_fails_over_to_rspamd(rspamd: RspamdServer, tmp_path: Path) -> None:
    scanner = RspamdScanner([f"unix:{tmp_path}/none.sock", rspamd.address], retry_after=60)
    assert "GTUBE" in check(scanner, gtube()).symbols
    assert scanner.upstreams.failures == 1
    assert scanner.upstreams.order()[0] == scanner.upstreams.endpoints[1]  # the dead one is put aside
    assert asyncio.run(RspamdScanner([rspamd.address]).ping()) == f"{rspamd.address}: pong"


# ---------------------------------------------------------------- the milter on rspamd's score


def service_on(tmp_path: Path, rspamd_address: str, directory: FakeDirectory | None = None,
               extra: str = "") -> MilterService:
    cfg = milter_config(tmp_path, f'spam_engine = "rspamd"\nrspamd = ["{rspamd_address}"]\n'
                                  f"rspamd_timeout = 5.0\n{extra}")
    return build_service(cfg, store=MemoryStore(), virus_scanner=FakeVirusScanner(),
                         injector=RecordingInjector(),
                         resolver=PolicyResolver(directory or sample_directory(), cfg))


def feed(service: MilterService, message: bytes, *recipients: str, queue_id: str = "QID1") -> Fed:
    """One message through the milter; the rspamd connections closed on the same loop."""
    async def run() -> Fed:
        try:
            return await drive(service, message, "jiro@remote.example", recipients, queue_id)
        finally:
            await service.pipeline.aclose()  # as the milter does before its loop ends

    fed = asyncio.run(run())
    assert service.delivery.flush_notices(10)
    return fed


def spam_headers(fed: Fed) -> dict[str, str]:
    return {n: v for n, v in fed.headers if n.lower().startswith("x-spam")}


def decision(caplog: pytest.LogCaptureFixture, queue_id: str) -> str:
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: ")]
    return line


def test_gtube_to_a_contracted_and_an_uncontracted_recipient(
        rspamd: RspamdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """taro has spam checking (reject score 15: refused), bob has not (delivered, no headers)."""
    service = service_on(tmp_path, rspamd.address)
    with caplog.at_level("INFO", logger="mailwarden.milter"):
        fed = feed(service, gtube(), "taro@example.jp", "bob@example.com", queue_id="GT1")
    assert fed.rc == protocol.ACCEPT
    assert fed.delrcpt == ["<taro@example.jp>"]
    assert spam_headers(fed) == {}
    line = decision(caplog, "GT1")
    assert re.search(r" spam=15\.0\(spam\) ", line) and "spam_tests=GTUBE" in line
    assert log_lines(rspamd, "qid: <GT1>")  # scored by rspamd, once


def test_ham_to_a_contracted_and_an_uncontracted_recipient(rspamd: RspamdServer, tmp_path: Path) -> None:
    service = service_on(tmp_path, rspamd.address)
    fed = feed(service, ham(), "taro@example.jp", "bob@example.com", queue_id="HAM1")
    assert fed.rc == protocol.ACCEPT and not fed.delrcpt
    assert spam_headers(fed) == {}  # ham stays as sent for both
    assert len(log_lines(rspamd, "qid: <HAM1>")) == 1


def test_each_recipients_threshold_action_and_reject_score_against_one_rspamd_score(
        rspamd: RspamdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Thresholds set around the score rspamd gives this message through the milter."""
    rcpts = ["low@example.jp", "junk@example.jp", "high@example.jp", "strict@example.jp", "off@example.jp"]
    probe = FakeDirectory()
    probe.add_domain("example.jp", enabled_service=["spam-check"])
    with caplog.at_level("INFO", logger="mailwarden.milter"):
        feed(service_on(tmp_path / "probe", rspamd.address, probe), ham(), *rcpts, queue_id="THR0")
    found = re.search(r" spam=(-?[0-9.]+)", decision(caplog, "THR0"))
    assert found is not None
    score = float(found[1])
    d = FakeDirectory()
    d.add_domain("example.jp", enabled_service=["spam-check"])
    d.add_user("low@example.jp", spam_threshold=f"{score - 1:.1f}", spam_action="subject",
               spam_subject_tag="[SPAM]")
    d.add_user("junk@example.jp", spam_threshold=f"{score - 1:.1f}", spam_action="junk")
    d.add_user("high@example.jp", spam_threshold=f"{score + 2:.1f}")
    d.add_user("strict@example.jp", spam_threshold=f"{score - 2:.1f}", spam_reject_score=f"{score - 0.5:.1f}")
    d.add_user("off@example.jp", disabled_service=["spam-check"])
    service = service_on(tmp_path, rspamd.address, d)
    with caplog.at_level("INFO", logger="mailwarden.milter"):
        fed = feed(service, ham(), *rcpts, queue_id="THR1")
    assert len(log_lines(rspamd, "qid: <THR1>")) == 1  # five recipients, one request
    line = decision(caplog, "THR1")
    assert f" spam={score:.1f}(spam) " in line and "spam_tests=" in line
    assert "strict@example.jp=reject[spam (score" in line
    assert "high@example.jp=deliver " in line and "off@example.jp=deliver " in line
    sent = service.delivery.injector.sent  # type: ignore[attr-defined]
    copies = {r: m for m in sent for r in m.recipients}
    low, junk = copies["low@example.jp"].data, copies["junk@example.jp"].data
    assert b"Subject: [SPAM] lunch on friday" in low
    assert b"X-Spam-Flag: YES" in low and b"X-Mailwarden-Junk" not in low
    assert b"X-Mailwarden-Junk: yes" in junk and b"Subject: lunch on friday" in junk
    status = re.search(rb"X-Spam-Status: Yes, score=(-?[0-9.]+) required=(-?[0-9.]+) tests=([^\r]+)", low)
    assert status is not None and float(status[1]) == pytest.approx(score, abs=0.05)
    assert b"MIME_GOOD" in status[3]  # rspamd's rule names
    # high and off keep the queued copy, which carries no spam headers.
    assert "high@example.jp" not in copies and "off@example.jp" not in copies
    assert spam_headers(fed) == {}


def test_the_milter_closes_a_waiting_rspamd_request_before_its_loop_ends(tmp_path: Path) -> None:
    """With metrics on the engine is wrapped (timed); closing reaches it all the same and
    ends a request rspamd has not answered: its check fails at once, its connection closed."""
    from mailwarden.metrics import Metrics
    from milters.metrics import MilterMetrics

    server = ScriptedHttp(None)
    scanner = RspamdScanner([f"inet:127.0.0.1:{server.port}"], timeout=30.0)
    cfg = milter_config(tmp_path, f'spam_engine = "rspamd"\nrspamd = ["inet:127.0.0.1:{server.port}"]\n')
    service = build_service(cfg, store=MemoryStore(), virus_scanner=FakeVirusScanner(), spam_scanner=scanner,
                            injector=RecordingInjector(), resolver=PolicyResolver(sample_directory(), cfg),
                            metrics=MilterMetrics(Metrics(on=True)))

    async def run() -> tuple[int, float]:
        waiting = asyncio.ensure_future(scanner.check(ham(), time.monotonic() + 30))
        while scanner.connections == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await service.pipeline.aclose()
        with pytest.raises(ScanError, match="client closed"):
            await waiting
        return scanner.connections, time.monotonic() - started

    try:
        left, took = asyncio.run(run())
    finally:
        server.close()
    assert left == 0 and took < 1.0


def test_rspamd_stopped_applies_each_recipients_failure_action(rspamd: RspamdServer, tmp_path: Path) -> None:
    d = FakeDirectory()
    d.add_domain("example.jp", enabled_service=["spam-check"])
    d.add_user("careful@example.jp")  # spam_failure_action = tempfail (the default)
    d.add_user("relaxed@example.jp", spam_failure_action="accept")
    service = service_on(tmp_path, rspamd.address, d)
    rspamd.stop()
    try:
        fed = feed(service, ham(), "careful@example.jp", queue_id="DOWN1")
        assert fed.rc == protocol.TEMPFAIL and fed.reply[0] == "451"
        assert "spam check failed: rspamd" in fed.reply[2]
        fed = feed(service, ham(), "relaxed@example.jp", queue_id="DOWN2")
        assert fed.rc == protocol.ACCEPT and spam_headers(fed) == {}
    finally:
        rspamd.start()
    fed = feed(service, ham(), "careful@example.jp", queue_id="UP1")
    assert fed.rc == protocol.ACCEPT


@pytest.mark.slapd
def test_the_milter_process_scores_with_rspamd_and_stops_cleanly(
        rspamd: RspamdServer, slapd: SlapdServer, tmp_path: Path) -> None:
    """``mailwarden milter run`` with ``spam_engine = "rspamd"``: GTUBE to a contracted and an
    uncontracted recipient (the directory is slapd with the sample data), scored once by
    rspamd; the process ends without leaving an HTTP session open."""
    from miltertest import constants as c

    from tests.milter.conftest import MilterProcess, archive_section, base_sections
    from tests.milter.mta import EomResult, MtaSession

    # example.com (bob's domain) archives: its copies go to an LMTP sink.
    with FakeClamd() as clamd, SmtpSink(lmtp=True) as archive:
        milter = MilterProcess(
            tmp_path, base_sections(ldap_uri=slapd.uri, store_path=tmp_path / "state.sqlite3")
            + archive_section(archive.port),
            f'clamd = ["{clamd.address}"]\nspam_engine = "rspamd"\nrspamd = ["{rspamd.unix_address}"]\n'
            "reinject = \"inet:127.0.0.1:9\"\nscan_cache_ttl = 0\n").start()
        try:
            session = MtaSession(milter.socket_path)
            session.connect()
            session.helo()
            result = session.message("s@remote.example", ["taro@example.jp", "bob@example.com"], gtube(),
                                     queue_id="PROC1")
            session.close()
        finally:
            milter.stop()
    assert isinstance(result, EomResult) and result.final == c.SMFIR_ACCEPT
    assert result.of(c.SMFIR_DELRCPT) == [{"rcpt": "<taro@example.jp>"}]
    assert [a["name"] for a in result.of(c.SMFIR_ADDHEADER)] == ["X-Mailwarden-Id"]
    assert len(log_lines(rspamd, "qid: <PROC1>")) == 1
    log = milter.log()
    assert "spam_tests=GTUBE" in log
    assert "Unclosed" not in log and "Traceback" not in log


def test_selftest_row(rspamd: RspamdServer, tmp_path: Path) -> None:
    config: Config = milter_config(tmp_path, f'spam_engine = "rspamd"\nrspamd = ["{rspamd.address}"]')
    assert _rspamd(config) == f"{rspamd.address}: GTUBE scored 15"
    assert _rspamd(milter_config(tmp_path)) == "not used (spam_engine = spamd)"
    dead = milter_config(tmp_path, f'spam_engine = "rspamd"\nrspamd = ["unix:{tmp_path}/none.sock"]')
    with pytest.raises(ProbeFailed, match="rspamd"):
        _rspamd(dead)


def test_milter_check_connect_reaches_the_configured_engine(rspamd: RspamdServer, tmp_path: Path) -> None:
    from tests.milter.test_cli import run, write_config

    cfg = write_config(tmp_path, f'spam_engine = "rspamd"\nrspamd = ["{rspamd.address}"]\n'
                                 f'spamd = ["unix:{tmp_path}/no-spamd.sock"]\n')
    _, out = run(cfg, "milter", "check", "--connect")  # no clamd, no directory here: 75
    assert f"rspamd: {rspamd.address}: pong" in out and "spamd:" not in out.replace("rspamd:", "")


# ---------------------------------------------------------------- both engines, one corpus


def corpus() -> list[tuple[str, bytes]]:
    """The messages of bench/bench_milter.py's load (meeting minutes, GTUBE) and a few
    ordinary kinds of spam and ham."""
    from bench.bench_milter import make_message as bench_message

    def msg(subject: str, body: str, *, html: bool = False, sender: str = "news@remote.example") -> bytes:
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = sender, "taro@example.jp", subject
        m["Message-ID"] = f"<{abs(hash(subject))}@remote.example>"
        m["Date"] = "Mon, 07 Dec 2026 01:00:00 +0000"
        if html:
            m.set_content(body, subtype="html")
        else:
            m.set_content(body)
        return m.as_bytes()

    return [
        ("minutes (bench ham)", bench_message("ham", 1, "taro@example.jp")),
        ("GTUBE (bench)", bench_message("gtube", 2, "taro@example.jp")),
        ("lunch", ham()),
        ("lottery", msg("CONGRATULATIONS!!! YOU HAVE WON $1,000,000 USD",
                        "Dear Winner,\n\nYour email address has won ONE MILLION US DOLLARS in the "
                        "international lottery. Send your bank account details and a processing fee "
                        "of $500 to claim your prize NOW!!!\n\nURGENT REPLY NEEDED\n")),
        ("html pills", msg("Cheap meds online", '<html><body><a href="http://pills.example/buy">'
                           "<b>CHEAP VIAGRA</b> 90% OFF</a> click here now!!! "
                           '<img src="http://pills.example/x.gif"></body></html>', html=True)),
        ("japanese ad", msg("未承諾広告※ 今だけ半額キャンペーン", "今すぐクリック！http://ad.example/\n")),
    ]


def test_both_engines_verdicts_on_one_corpus_side_by_side(rspamd: RspamdServer, spamd: SpamdServer) -> None:
    """Printed, not compared: the engines score differently.  Both must score every
    message, and both call GTUBE spam."""
    engines = {"spamd": SpamdScanner([spamd.address]), "rspamd": RspamdScanner([rspamd.address])}
    rspamd_client = engines["rspamd"]
    assert isinstance(rspamd_client, RspamdScanner)
    query = SpamQuery(sender="news@remote.example", recipients=("taro@example.jp",),
                      client_address=CLIENT_IP, client_name="client.example", helo="client.example")
    trace = (b"Received: from client.example (client.example [192.0.2.10])\r\n\tby mx.example.jp (Postfix) "
             b"with ESMTP id 4AbC;\r\n\tMon, 07 Dec 2026 01:00:00 +0000\r\n")

    async def score_all() -> dict[str, dict[str, SpamResult]]:
        out: dict[str, dict[str, SpamResult]] = {}
        for name, data in corpus():
            # As the milter sends them: spamd with the rebuilt Received: field, rspamd without.
            out[name] = {"spamd": await engines["spamd"].check(trace + data, time.monotonic() + 30, query),
                         "rspamd": await engines["rspamd"].check(data, time.monotonic() + 30, query)}
        await rspamd_client.close()
        return out

    found = asyncio.run(score_all())
    print(f"\n{'message':<22} {'spamd':>8}  {'rspamd':>8}  rspamd's weightiest rules")
    for name, by in found.items():
        sa, rs = by["spamd"], by["rspamd"]
        print(f"{name:<22} {sa.score:>8.1f}  {rs.score:>8.1f}  {','.join(rs.symbols[:4])}")
    assert len(found) == len(corpus())
    gtube_found = found["GTUBE (bench)"]
    assert gtube_found["spamd"].score >= 1000 and "GTUBE" in gtube_found["rspamd"].symbols


def test_an_smtputf8_envelope_is_passed_as_far_as_rspamd_reads_it(rspamd: RspamdServer) -> None:
    """rspamd 3.4 drops a request whose From or Rcpt has a non-ASCII local part: those
    are left out, an internationalised domain goes as A-labels."""
    query = SpamQuery(sender="送信者@remote.example", recipients=("太郎@example.jp", "taro@例え.jp"),
                      client_address=CLIENT_IP, helo="client.example\r\nX: y", queue_id="UTF8Q1")
    pairs = request_headers(query, skip_auth=True)
    assert "From" not in dict(pairs) and "Helo" not in dict(pairs)
    assert [v for n, v in pairs if n == "Rcpt"] == ["taro@xn--r8jz45g.jp"]
    assert check(RspamdScanner([rspamd.address]), ham(), query).symbols
    (line,) = log_lines(rspamd, "qid: <UTF8Q1>")
    assert "rcpts: <taro@xn--r8jz45g.jp>" in line
