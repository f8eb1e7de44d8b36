"""The milter as its own process on a unix socket, driven by an MTA-side client.

The directory is the session's real slapd with the sample data; clamd and spamd
are fake socket servers here (so they can be slow or dead on cue) and the
re-injection smtpd is an SMTP sink.  Every test runs against one milter process and
against two worker processes sharing the socket (``milter.workers = 2``).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from miltertest import constants as c

from harness.clamd import EICAR, FakeClamd
from harness.ports import free_port
from harness.slapd import SlapdServer
from harness.smtpsink import SmtpSink
from harness.spamd import GTUBE, FakeSpamd
from tests.milter.conftest import MilterProcess, archive_section, base_sections
from tests.milter.helpers import make_message
from tests.milter.mta import EomResult, MtaSession, reply_text

pytestmark = pytest.mark.slapd
WORKERS = [1, 2]


class Rig:
    def __init__(self, milter: MilterProcess, clamd: FakeClamd, spamd: FakeSpamd, sink: SmtpSink,
                 workers: int) -> None:
        self.milter, self.clamd, self.spamd, self.sink = milter, clamd, spamd, sink
        self.workers = workers

    def session(self) -> MtaSession:
        s = MtaSession(self.milter.socket_path)
        s.connect()
        s.helo()
        return s

    def send(self, raw: bytes, sender: str, *recipients: str) -> EomResult:
        s = self.session()
        try:
            result = s.message(sender, list(recipients), raw)
        finally:
            s.close()
        assert isinstance(result, EomResult), result
        return result


@pytest.fixture(scope="module", params=WORKERS, ids=lambda n: f"workers={n}")
def rig(request: pytest.FixtureRequest, slapd: SlapdServer, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Rig]:
    workers = request.param
    work = tmp_path_factory.mktemp(f"milter-proto-{workers}")
    with (FakeClamd() as clamd, FakeSpamd(score=1.0) as spamd, SmtpSink() as sink,
          SmtpSink(lmtp=True) as archive):
        sections = base_sections(ldap_uri=slapd.uri, store_path=work / "state.sqlite3")
        milter = MilterProcess(
            work, sections + archive_section(archive.port),
            f'workers = {workers}\nmta_timeout = 3\n'
            f'clamd = ["unix:{work}/dead-clamd.sock", "{clamd.address}"]\nclamd_timeout = 1.0\n'
            f'spamd = ["{spamd.address}"]\nspamd_timeout = 1.0\nupstream_retry = 60\n'
            f'reinject = "inet:127.0.0.1:{sink.port}"\nscan_cache_ttl = 0\n',
        ).start()
        milter.wait_for_log(f"({workers} worker(s)")
        yield Rig(milter, clamd, spamd, sink, workers)
        milter.stop()


@pytest.fixture(autouse=True)
def _reset(rig: Rig) -> None:
    rig.clamd.mode = "ok"
    rig.spamd.mode = "ok"
    rig.spamd.score = 1.0
    rig.milter.wait_for_notices()
    rig.sink.clear()


def test_negotiates_only_the_actions_it_uses(rig: Rig) -> None:
    s = MtaSession(rig.milter.socket_path)
    s.close()
    wanted = c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_CHGBODY | c.SMFIF_DELRCPT
    assert s.actions & wanted == wanted
    assert not s.actions & (c.SMFIF_ADDRCPT | c.SMFIF_CHGFROM | c.SMFIF_QUARANTINE)
    assert s.protocol & 0x80 and s.protocol & 0x80000  # no reply awaited per header / body chunk


def test_asks_the_mta_to_skip_the_steps_it_does_not_use(rig: Rig) -> None:
    s = MtaSession(rig.milter.socket_path)
    s.close()
    # End of header, DATA and unknown commands: each skipped step saves packets and a
    # callback into Python for every message.
    assert s.protocol & c.SMFIP_NOEOH and s.protocol & c.SMFIP_NODATA and s.protocol & c.SMFIP_NOUNKNOWN
    assert not s.protocol & (c.SMFIP_NOCONNECT | c.SMFIP_NOHELO | c.SMFIP_NOMAIL | c.SMFIP_NORCPT
                             | c.SMFIP_NOHDRS | c.SMFIP_NOBODY)


def test_clean_mail_is_accepted_without_changes(rig: Rig) -> None:
    result = rig.send(make_message().as_bytes(), "s@remote.example", "taro@example.jp")
    assert result.final == c.SMFIR_ACCEPT
    # The only change: the mailwarden id, which the log line names too.
    [(_, added)] = result.actions
    assert added == {"name": "X-Mailwarden-Id", "value": added["value"]}
    line = rig.milter.wait_for_log("TESTQ1: accept")
    assert f"mwid={added['value']} " in line
    assert "taro@example.jp=deliver" in line and "virus=clean" in line and "spam=1.0" in line


def test_virus_is_refused_with_a_clear_5xx(rig: Rig) -> None:
    result = rig.send(make_message(body=EICAR.decode()).as_bytes(), "s@remote.example", "taro@example.jp")
    assert result.final == c.SMFIR_REPLYCODE
    assert result.reply.startswith("550 5.7.1") and "virus Eicar-Test-Signature" in result.reply


def test_variant_goes_out_through_reinjection_and_the_recipient_is_removed(rig: Rig) -> None:
    rig.spamd.score = 7.0  # spam for taro (threshold 5, junk), bob has no spam service
    result = rig.send(make_message().as_bytes(), "s@remote.example", "taro@example.jp", "bob@example.com")
    assert result.final == c.SMFIR_ACCEPT
    assert result.of(c.SMFIR_DELRCPT) == [{"rcpt": "<taro@example.jp>"}]
    [bob_id] = result.of(c.SMFIR_ADDHEADER)  # bob's queued copy: only the mailwarden id
    assert bob_id["name"] == "X-Mailwarden-Id"
    (copy,) = rig.sink.wait_for(1)
    assert copy.recipients == ("taro@example.jp",) and copy.envelope_sender == "s@remote.example"
    assert copy.header("X-Mailwarden-Id") == bob_id["value"]  # one message, one id, every copy
    assert copy.header("X-Mailwarden-Junk") == "yes" and copy.header("X-Spam-Flag") == "YES"


def test_subject_tag_is_a_header_change_on_the_wire(rig: Rig) -> None:
    rig.spamd.score = 4.0  # hanako: threshold 3.5, action subject
    result = rig.send(make_message(subject="hello").as_bytes(), "s@remote.example", "hanako@example.jp")
    assert {"index": 1, "name": "Subject", "value": "[SPAM] hello"} in result.of(c.SMFIR_CHGHEADER)
    assert {"name": "X-Spam-Flag", "value": "YES"} in result.of(c.SMFIR_ADDHEADER)


def test_directory_alias_resolves_for_the_recipient(rig: Rig) -> None:
    raw = make_message(body=EICAR.decode()).as_bytes()
    result = rig.send(raw, "s@remote.example", "taro.yamada@example.ne.jp")
    assert result.final == c.SMFIR_REPLYCODE and result.reply.startswith("550")


def test_first_clamd_upstream_dead_fails_over_to_the_second(rig: Rig) -> None:
    before = rig.clamd.scans
    rig.send(make_message(body="fail over").as_bytes(), "s@remote.example", "taro@example.jp")
    assert rig.clamd.scans == before + 1


def test_hanging_clamd_tempfails_within_the_timeout(rig: Rig) -> None:
    rig.clamd.mode = "hang"
    started = time.monotonic()
    result = rig.send(make_message(body="slow").as_bytes(), "s@remote.example", "taro@example.jp")
    assert result.final == c.SMFIR_REPLYCODE and result.reply.startswith("451 4.7.1")
    assert time.monotonic() - started < 5


def _logged(rig: Rig, since: int, queue_id: str) -> str:
    return rig.milter.wait_for_log(f"{queue_id}: ", since=since)


def test_small_and_large_mail_are_decided_alike(rig: Rig) -> None:
    """One path for every message: small and large mail, with and without spam checking."""
    since = len(rig.milter.log())
    big = make_message(body="x" * 300_000).as_bytes()
    s = rig.session()
    try:
        for queue_id, rcpt, raw in [("ONEQ1", "bob@example.com", make_message().as_bytes()),
                                    ("ONEQ2", "taro@example.jp", make_message().as_bytes()),
                                    ("ONEQ3", "taro@example.jp", big)]:
            assert s.message("s@remote.example", [rcpt], raw, queue_id=queue_id).final == c.SMFIR_ACCEPT
    finally:
        s.close()
    virus_only, with_spam, large = (_logged(rig, since, q) for q in ("ONEQ1", "ONEQ2", "ONEQ3"))
    assert "virus=clean" in virus_only and "spam=" not in virus_only and "spam=1.0" in with_spam
    assert "virus=clean" in large and "spam=1.0" in large


def test_virus_is_refused_with_its_name(rig: Rig) -> None:
    result = rig.send(make_message(body=EICAR.decode()).as_bytes(), "s@remote.example", "bob@example.com")
    assert result.final == c.SMFIR_REPLYCODE
    assert result.reply.startswith("550 5.7.1") and "virus Eicar-Test-Signature" in result.reply


@pytest.mark.parametrize(("backend", "rcpt"), [("clamd", "bob@example.com"), ("spamd", "taro@example.jp")])
def test_hanging_backend_tempfails_and_blocks_no_one(rig: Rig, backend: str,
                                                                      rcpt: str) -> None:
    (rig.clamd if backend == "clamd" else rig.spamd).mode = "hang"
    waiting = rig.session()
    try:
        waiting.mail("s@remote.example")
        waiting.rcpt(rcpt)
        waiting.header("Subject", "slow")
        waiting.body(b"slow\r\n")
        started = time.monotonic()
        waiting.conn.send_macro(c.SMFIC_BODYEOB, i="SLOWQ1")
        waiting._raw(c.SMFIC_BODYEOB, b"")
        # While that backend hangs, another SMTP session is served at once.
        other = rig.session()
        try:
            assert other.mail("s@remote.example") in (None, c.SMFIR_CONTINUE)
            assert other.rcpt("hanako@example.jp") in (None, c.SMFIR_CONTINUE)
        finally:
            other.close()
        assert time.monotonic() - started < 0.9, f"the hanging {backend} held up another session"
        reply = waiting.conn.recv()
        assert reply is not None and reply[0] == c.SMFIR_REPLYCODE
        assert reply_text(reply[1]).startswith("451 4.7.1")
        assert time.monotonic() - started < 5
    finally:
        waiting.close()


def test_hanging_spamd_tempfails_only_contracted_mail(rig: Rig) -> None:
    rig.spamd.mode = "hang"
    ok = rig.send(make_message(body="no spam service").as_bytes(), "s@remote.example", "bob@example.com")
    assert ok.final == c.SMFIR_ACCEPT
    deferred = rig.send(make_message(body="spam service").as_bytes(), "s@remote.example", "taro@example.jp")
    assert deferred.reply.startswith("451")


def test_gtube_with_contracted_and_uncontracted_recipients(rig: Rig) -> None:
    raw = make_message(body=GTUBE).as_bytes()
    result = rig.send(raw, "s@remote.example", "taro@example.jp", "bob@example.com")
    assert result.final == c.SMFIR_ACCEPT
    assert result.of(c.SMFIR_DELRCPT) == [{"rcpt": "<taro@example.jp>"}]
    assert [a["name"] for a in result.of(c.SMFIR_ADDHEADER)] == ["X-Mailwarden-Id"]
    assert rig.sink.messages == []


def test_8bit_junk_in_headers_gets_a_verdict(rig: Rig) -> None:
    s = rig.session()
    s.mail("s@remote.example")
    s.rcpt("taro@example.jp")
    s.step(c.SMFIC_DATA, b"")
    s.header("Subject", b"\xff\xfe\x80\x1b$B junk \x8e")
    s.header("From", b"\x00\x01 <a@b>")
    s.eoh()
    s.body(b"hello\r\n")
    result = s.eom("JUNKQ")
    s.close()
    assert result.final == c.SMFIR_ACCEPT
    rig.milter.wait_for_log("JUNKQ: accept")


def test_client_gone_mid_message_leaves_no_spool_and_milter_serves_on(rig: Rig) -> None:
    s = rig.session()
    s.mail("s@remote.example")
    s.rcpt("taro@example.jp")
    s.step(c.SMFIC_DATA, b"")
    s.header("Subject", "cut")
    s.eoh()
    s.body(b"x" * 3_000_000)  # over the memory limit: spooled to disk
    s.close()
    time.sleep(0.3)
    assert list((rig.milter.dir / "spool").iterdir()) == []
    result = rig.send(make_message().as_bytes(), "s@remote.example", "taro@example.jp")
    assert result.final == c.SMFIR_ACCEPT


def test_broken_mime_gets_a_verdict(rig: Rig) -> None:
    raw = (b"From: a@b\r\nSubject: broken\r\nContent-Type: multipart/mixed; boundary=\"q\"\r\n\r\n"
           b"--q\r\nContent-Type: application/octet-stream; name=\"x.exe\"\r\nContent-Transfer-Encod")
    result = rig.send(raw, "s@remote.example", "taro@example.jp")
    assert result.final == c.SMFIR_REPLYCODE and "x.exe" in result.reply


def test_directory_down_defers_the_recipient(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        milter = MilterProcess(
            tmp_path, base_sections(ldap_uri=f"ldap://127.0.0.1:{free_port()}/",
                                    store_path=tmp_path / "state.sqlite3"),
            f'clamd = ["unix:{tmp_path}/none.sock"]\n'
            f'reinject = "inet:127.0.0.1:{sink.port}"\n',
        ).start()
        try:
            s = MtaSession(milter.socket_path)
            s.connect()
            s.mail("s@remote.example")
            started = time.monotonic()
            code = s.rcpt("taro@example.jp")
            s.close()
            assert code == c.SMFIR_REPLYCODE and s.last_reply.startswith("451 4.3.0")
            assert time.monotonic() - started < 20  # inside Postfix's milter_command_timeout
        finally:
            milter.stop()


# ---------------------------------------------------------------- the connection itself


def test_a_whole_message_in_one_write_is_answered_once(rig: Rig) -> None:
    """Postfix may have several packets in flight: every step is read, in order."""
    s = rig.session()
    packets = [(c.SMFIC_MACRO, b"Mi\0PIPEQ\0"), (c.SMFIC_MAIL, b"<s@remote.example>\0")]
    s.conn.sock.sendall(b"".join(struct.pack("!Lc", len(d) + 1, cmd.encode()) + d for cmd, d in packets))
    assert s.rcpt("taro@example.jp") == c.SMFIR_CONTINUE
    head = b"".join(struct.pack("!Lc", len(d) + 1, b"L") + d
                    for d in (b"From\0a@remote.example\0", b"Subject\0one write\0"))
    body = struct.pack("!Lc", 8, b"B") + b"hello\r\n"
    s.conn.sock.sendall(head + body)
    result = s.eom("PIPEQ")
    s.close()
    assert result.final == c.SMFIR_ACCEPT
    rig.milter.wait_for_log("PIPEQ: accept")


def test_abort_then_a_second_message_on_the_same_connection(rig: Rig) -> None:
    s = rig.session()
    s.mail("s@remote.example")
    s.rcpt("taro@example.jp")
    s.header("Subject", "dropped")
    s.body(b"x" * 1000)
    s._raw(c.SMFIC_ABORT, b"")
    result = s.message("s@remote.example", ["taro@example.jp"], make_message(body=EICAR.decode()).as_bytes(),
                       queue_id="SECONDQ")
    s.close()
    assert isinstance(result, EomResult) and result.reply.startswith("550 5.7.1")


def test_client_gone_during_end_of_message_work_leaves_the_milter_serving(rig: Rig) -> None:
    rig.clamd.mode = "hang"
    s = rig.session()
    s.mail("s@remote.example")
    s.rcpt("taro@example.jp")
    s.header("Subject", "gone")
    s.body(b"going away\r\n")
    s.conn.send_macro(c.SMFIC_BODYEOB, i="GONEQ")
    s._raw(c.SMFIC_BODYEOB, b"")
    s.close()  # while the scan hangs
    rig.milter.wait_for_log("GONEQ: tempfail", timeout=15)  # the work is finished and logged
    rig.clamd.mode = "ok"
    assert rig.send(make_message().as_bytes(), "s@remote.example", "taro@example.jp").final == c.SMFIR_ACCEPT


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_oversized_packet_closes_the_connection_with_one_log_line(rig: Rig) -> None:
    s = rig.session()
    s.conn.sock.sendall(struct.pack("!L", 50_000_000) + b"B")
    assert _closed(s.conn.sock)
    s.close()
    rig.milter.wait_for_log("milter connection dropped: packet of 50000000 bytes")
    assert rig.send(make_message().as_bytes(), "s@remote.example", "taro@example.jp").final == c.SMFIR_ACCEPT


def test_unknown_command_closes_the_connection(rig: Rig) -> None:
    s = rig.session()
    s._raw("Z", b"junk")
    assert _closed(s.conn.sock)
    s.close()
    rig.milter.wait_for_log("unknown command 'Z'")


def test_silent_mta_is_dropped_after_mta_timeout(rig: Rig) -> None:
    s = rig.session()
    s.mail("s@remote.example")
    started = time.monotonic()
    assert _closed(s.conn.sock) or _closed(s.conn.sock)  # mta_timeout = 3 s, checked every 0.75 s
    s.close()
    assert 2.5 < time.monotonic() - started < 9
    rig.milter.wait_for_log("MTA silent for over 3s")


def test_quit_with_new_connection_starts_afresh_on_the_same_socket(rig: Rig) -> None:
    s = rig.session()
    s._raw(c.SMFIC_QUIT_NC, b"")
    s.connect()
    s.helo()
    result = s.message("s@remote.example", ["taro@example.jp"], make_message().as_bytes(), queue_id="KQ")
    s.close()
    assert isinstance(result, EomResult) and result.final == c.SMFIR_ACCEPT
