"""The archive's asyncio LMTP client against a real Dovecot (harness.dovecot), and its
pipelining against a recording server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from harness.dovecot import DovecotServer, missing_dovecot
from harness.slapd import SlapdServer
from milters.lmtp import LmtpClient, LmtpError, dot_stuffed

MESSAGE = (b"From: x@outside.test\r\nTo: alice@example.com\r\nSubject: copy {n}\r\n\r\n"
           b"first line\n.a line that starts with a dot\r\n..two dots\rlast\r\n")


@pytest.fixture(scope="module")
def dovecot(slapd: SlapdServer) -> Iterator[DovecotServer]:
    reason = missing_dovecot()
    if reason:
        pytest.skip(reason)
    with DovecotServer(slapd.uri) as server:
        yield server


def test_dot_stuffing_and_line_ends() -> None:
    assert dot_stuffed(b"a\n.b\r..c\r\nd") == b"a\r\n..b\r\n...c\r\nd\r\n.\r\n"


def test_copies_on_one_session_arrive_intact(dovecot: DovecotServer) -> None:
    async def run() -> list[int]:
        client = await LmtpClient.open("127.0.0.1", dovecot.lmtp_port, 5)
        # Dovecot offers both: the copy goes out as MAIL, RCPT and BDAT in one write.
        assert {"PIPELINING", "CHUNKING"} <= client.capabilities
        codes = []
        for n in range(3):
            replies = await client.deliver("x@outside.test", ["alice@example.com"],
                                           MESSAGE.replace(b"{n}", str(n).encode()), 5)
            codes.append(replies["alice@example.com"].code)
        client.quit()
        return codes

    before = len(dovecot.messages("alice@example.com"))
    assert asyncio.run(run()) == [250, 250, 250]
    stored = dovecot.messages("alice@example.com")[before:]
    assert [m["Subject"] for m in stored] == ["copy 0", "copy 1", "copy 2"]
    body = stored[0].get_payload()
    assert isinstance(body, str)
    assert body.splitlines() == ["first line", ".a line that starts with a dot", "..two dots", "last"]


def test_a_refused_recipient_leaves_the_session_usable(dovecot: DovecotServer) -> None:
    async def run() -> tuple[LmtpError, int]:
        client = await LmtpClient.open("127.0.0.1", dovecot.lmtp_port, 5)
        with pytest.raises(LmtpError) as refused:
            await client.deliver("x@outside.test", ["nobody@example.com"], MESSAGE, 5)
        # The same session takes the next transaction.
        replies = await client.deliver("x@outside.test", ["alice@example.com"], MESSAGE, 5)
        client.quit()
        return refused.value, replies["alice@example.com"].code

    error, code = asyncio.run(run())
    assert error.stage == "RCPT" and error.reply is not None and error.reply.code == 550
    assert not error.dropped and code == 250


def test_a_session_the_server_ended_is_reported_as_dropped(dovecot: DovecotServer) -> None:
    async def run() -> LmtpError:
        client = await LmtpClient.open("127.0.0.1", dovecot.lmtp_port, 5)
        sock = client.writer.get_extra_info("socket")
        sock.shutdown(socket.SHUT_WR)  # Dovecot reads end of file and closes its side
        await asyncio.sleep(0.2)
        with pytest.raises(LmtpError) as ended:
            await client.deliver("x@outside.test", ["alice@example.com"], MESSAGE, 5)
        assert not client.usable
        return ended.value

    assert asyncio.run(run()).dropped


def test_nothing_listening_is_an_error_not_a_crash() -> None:
    async def run() -> LmtpError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(LmtpError) as down:
            await LmtpClient.open("127.0.0.1", port, 2)
        return down.value

    error = asyncio.run(run())
    assert error.stage == "connect" and error.dropped


def test_mail_rcpt_and_data_go_out_in_one_write() -> None:
    """PIPELINING without CHUNKING: the server sees the three commands before it has
    answered any, then the dot-terminated message."""
    seen: list[bytes] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder LMTP\r\n")
        await reader.readline()
        writer.write(b"250-recorder\r\n250 PIPELINING\r\n")
        await asyncio.sleep(0.1)  # let everything the client wrote arrive
        seen.append(await reader.read(4096))
        writer.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        seen.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"452 4.2.2 over quota\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async def run() -> int:
        listener = await asyncio.start_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            client = await LmtpClient.open("127.0.0.1", port, 5)
            replies = await client.deliver("x@outside.test", ["archive@example.com"], b"body\r\n", 5)
            client.quit()
            return replies["archive@example.com"].code

    assert asyncio.run(run()) == 452
    assert seen[0] == b"MAIL FROM:<x@outside.test>\r\nRCPT TO:<archive@example.com>\r\nDATA\r\n"
    assert seen[1] == b"body\r\n.\r\n"


def test_with_chunking_the_envelope_and_the_message_go_out_in_one_write() -> None:
    """CHUNKING: MAIL, RCPT and BDAT with the whole message, before any reply; a refused
    recipient's chunk is answered once and RSET keeps the session."""
    seen: list[bytes] = []
    body = b"Subject: x\r\n\r\n.dot stays single\r\n"
    bdat = b"MAIL FROM:<x@outside.test>\r\nRCPT TO:<%s>\r\nBDAT %d LAST\r\n" + body

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder LMTP\r\n")
        await reader.readline()
        writer.write(b"250-recorder\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        first = bdat % (b"archive@example.com", len(body))
        seen.append(await reader.readexactly(len(first)))
        writer.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 <archive@example.com> Saved\r\n")
        refused = bdat % (b"nobody@example.com", len(body))
        seen.append(await reader.readexactly(len(refused)))
        writer.write(b"250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n503 5.5.1 No valid recipients\r\n")
        seen.append(await reader.readline())
        writer.write(b"250 2.0.0 Ok\r\n")
        await reader.read()
        writer.close()

    async def run() -> tuple[int, LmtpError]:
        listener = await asyncio.start_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            client = await LmtpClient.open("127.0.0.1", port, 5)
            replies = await client.deliver("x@outside.test", ["archive@example.com"], body, 5)
            with pytest.raises(LmtpError) as refused:
                await client.deliver("x@outside.test", ["nobody@example.com"], body, 5)
            assert client.usable
            client.quit()
            return replies["archive@example.com"].code, refused.value

    code, refused = asyncio.run(run())
    assert code == 250
    assert refused.stage == "RCPT" and refused.reply is not None and refused.reply.code == 550
    assert seen == [bdat % (b"archive@example.com", len(body)), bdat % (b"nobody@example.com", len(body)),
                    b"RSET\r\n"]
