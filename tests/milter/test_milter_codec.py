"""The milter protocol codec (milters.protocol): framing, limits, payloads, and a bounded fuzz."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from miltertest import codec as mt
from miltertest import constants as c

from milters import protocol as p


def test_packets_come_out_in_order_many_per_feed() -> None:
    data = p.encode(p.MACRO, b"Mi\0Q1\0") + p.encode(p.MAIL, b"<a@b>\0") + p.encode(p.HEADER, b"A\0b\0")
    expected = [(p.MACRO, b"Mi\0Q1\0"), (p.MAIL, b"<a@b>\0"), (p.HEADER, b"A\0b\0")]
    assert p.PacketReader().feed(data) == expected


def test_a_packet_split_byte_by_byte_comes_out_once() -> None:
    data = p.encode(p.BODY, b"x" * 300)
    reader = p.PacketReader()
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i:i + 1])
    assert out == [(p.BODY, b"x" * 300)] and reader.pending == 0


def test_partial_packet_is_held_back() -> None:
    reader = p.PacketReader()
    assert reader.feed(p.encode(p.BODY, b"abc")[:-1]) == []
    assert reader.pending == 7
    assert reader.feed(b"c") == [(p.BODY, b"abc")]


def test_packet_over_the_limit_is_refused_before_it_is_buffered() -> None:
    reader = p.PacketReader(max_packet=1000)
    with pytest.raises(p.ProtocolError, match="1002 bytes"):
        reader.feed(struct.pack(">I", 1002) + b"B")  # only the length has arrived
    assert reader.pending == 0


@pytest.mark.parametrize("data", [struct.pack(">I", 0) + b"xxxx", p.encode("Z", b"junk")],
                         ids=["empty", "unknown-command"])
def test_empty_or_unknown_packet_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.PacketReader().feed(data)


def test_optneg_as_miltertest_sends_it() -> None:
    (cmd, data), = p.PacketReader().feed(mt.encode_optneg(c.SMFI_V6_ACTS, c.SMFI_V6_PROT))
    assert cmd == p.OPTNEG and p.parse_optneg(data) == p.Optneg(6, 0x1FF, 0x1FFFFF)
    with pytest.raises(p.ProtocolError):
        p.parse_optneg(b"\0\0\0\6")


def test_optneg_reply_decodes_in_miltertest() -> None:
    raw = p.encode_optneg(p.Optneg(6, 0x19, 0x1234))
    cmd, args, rest = mt.decode_msg(raw)
    assert (cmd, rest) == (c.SMFIC_OPTNEG, b"")
    assert args == {"version": 6, "actions": 0x19, "protocol": 0x1234}


def test_macros_name_their_stage() -> None:
    stage, values = p.parse_macros(b"Ei\0TESTQ\0{daemon_name}\0mx\0")
    assert stage == p.BODYEOB and values == {"i": "TESTQ", "{daemon_name}": "mx"}
    assert p.parse_macros(b"L") == ("L", {})
    assert p.parse_macros(b"Mlonely\0") == ("M", {"lonely": ""})


@pytest.mark.parametrize(("raw", "expected"), [
    (b"client.example\x004\x09\xdd192.0.2.10\0", p.Connect("client.example", "4", 2525, "192.0.2.10")),
    (b"h\x006\x00\x19IPv6:2001:db8::1\0", p.Connect("h", "6", 25, "IPv6:2001:db8::1")),
    (b"localhost\0L\0\0/run/sock\0", p.Connect("localhost", "L", 0, "/run/sock")),
    (b"unknown\0U", p.Connect("unknown", "U", 0, "")),
])
def test_connect_payloads(raw: bytes, expected: p.Connect) -> None:
    assert p.parse_connect(raw) == expected


@pytest.mark.parametrize("raw", [b"noterminator", b"h\0", b"h\0X\0\0a\0", b"h\x004\x01"])
def test_malformed_connect_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_connect(raw)


def test_header_keeps_8bit_junk_and_needs_a_value() -> None:
    assert p.parse_header(b"Subject\0\xff\xfe junk\0") == ("Subject", b"\xff\xfe junk")
    assert p.parse_header(b"X-Empty\0\0") == ("X-Empty", b"")
    with pytest.raises(p.ProtocolError):
        p.parse_header(b"Subject")


def test_strings_with_and_without_the_last_terminator() -> None:
    assert p.split_strings(b"<a@b>\0SIZE=10\0") == [b"<a@b>", b"SIZE=10"]
    assert p.split_strings(b"<a@b>") == [b"<a@b>"]
    assert p.split_strings(b"") == []


@pytest.mark.parametrize(("raw", "cmd", "args"), [
    (p.encode_replycode("550 5.7.1 no"), c.SMFIR_REPLYCODE,
     {"smtpcode": "550", "space": " ", "text": "5.7.1 no"}),
    (p.encode_addheader("X-Spam-Flag", "YES"), c.SMFIR_ADDHEADER, {"name": "X-Spam-Flag", "value": "YES"}),
    (p.encode_insheader(0, "X-A", "1"), c.SMFIR_INSHEADER, {"index": 0, "name": "X-A", "value": "1"}),
    (p.encode_chgheader(1, "Subject", "[SPAM] hi"), c.SMFIR_CHGHEADER,
     {"index": 1, "name": "Subject", "value": "[SPAM] hi"}),
    (p.encode_delrcpt("<a@b>"), c.SMFIR_DELRCPT, {"rcpt": "<a@b>"}),
    (p.encode_addrcpt("<a@b>"), c.SMFIR_ADDRCPT, {"rcpt": "<a@b>"}),
    (p.encode_replbody(b"new body\r\n"), c.SMFIR_REPLBODY, {"buf": "new body\r\n"}),
    (p.encode(p.ACCEPT), c.SMFIR_ACCEPT, {}),
    (p.encode(p.TEMPFAIL), c.SMFIR_TEMPFAIL, {}),
])
def test_replies_decode_in_miltertest(raw: bytes, cmd: str, args: dict[str, object]) -> None:
    got_cmd, got_args, rest = mt.decode_msg(raw)
    assert (got_cmd, got_args, rest) == (cmd, args, b"")


def test_header_values_are_utf8_and_never_carry_a_nul() -> None:
    _, args, _ = mt.decode_msg(p.encode_chgheader(1, "Subject", "[迷惑] a\0b"))
    assert args["value"] == "[迷惑] ab"


def test_reply_text_is_built_and_checked_like_libmilter() -> None:
    assert p.reply_text("451", "4.3.0", "try later") == "451 4.3.0 try later"
    assert p.reply_text("550", None, "no") == "550 no"
    assert p.reply_text("550", "5.7.1", "a", "b") == "550-5.7.1 a\r\n550 5.7.1 b"
    for bad in (("250", None, "ok"), ("55", None, "x"), ("550", "5.7", "x"), ("550", None, "a\r\nb")):
        with pytest.raises(ValueError):
            p.reply_text(*bad)


# ---------------------------------------------------------------- fuzz

commands = st.sampled_from(sorted(p.MTA_COMMANDS))
packets = st.lists(st.tuples(commands, st.binary(max_size=300)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(packets, st.lists(st.integers(1, 80), max_size=40))
def test_fuzz_any_packets_in_any_chunking_come_out_whole(items: list[tuple[str, bytes]],
                                                         cuts: list[int]) -> None:
    data = b"".join(p.encode(cmd, payload) for cmd, payload in items)
    reader = p.PacketReader()
    out: list[tuple[str, bytes]] = []
    pos = 0
    for size in cuts:
        out += reader.feed(data[pos:pos + size])
        pos += size
    out += reader.feed(data[pos:])
    assert out == items and reader.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_fuzz_arbitrary_bytes_raise_only_protocol_errors_and_stay_bounded(chunks: list[bytes]) -> None:
    reader = p.PacketReader(max_packet=512)
    for chunk in chunks:
        try:
            for cmd, payload in reader.feed(chunk):
                assert cmd in p.MTA_COMMANDS and len(payload) < 512
        except p.ProtocolError:
            return
        assert reader.pending <= 512 + 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_fuzz_payload_parsers_raise_only_protocol_errors(data: bytes) -> None:
    for parse in (p.parse_connect, p.parse_header, p.parse_macros, p.parse_optneg):
        with contextlib.suppress(p.ProtocolError):
            parse(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcdefghij{}_", min_size=1, max_size=12),
                       st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                               max_size=30), max_size=8))
def test_fuzz_macros_round_trip(values: dict[str, str]) -> None:
    raw = b"E" + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
    assert p.parse_macros(raw) == ("E", values)


def _macros(stage: str, **values: str) -> bytes:
    return stage.encode() + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())


def test_macros_are_found_by_either_spelling_latest_stage_first() -> None:
    from milters.server import Macros

    macros = Macros()
    macros.keep(_macros("C", j="mx.example", **{"{daemon_name}": "smtpd"}))
    macros.keep(_macros("M", **{"{i}": "EARLY", "{mail_addr}": "a@remote.example"}))
    macros.keep(_macros("E", i="4XyZ"))
    macros.keep(_macros("R", **{"{rcpt_addr}": "bj@example.jp"}))  # a value ending in "j"
    assert macros.get("i") == "4XyZ" and macros.get("{i}") == "4XyZ"
    assert macros.get("j") == "mx.example" and macros.get("{j}") == "mx.example"
    assert macros.get("daemon_name") == "smtpd" and macros.get("{mail_addr}") == "a@remote.example"
    assert macros.get("{auth_authen}") is None
    macros.drop_message(keep_mail=False)
    assert macros.get("i") is None and macros.get("j") == "mx.example"


def test_replies_encode_as_the_mta_expects() -> None:
    from milters.server import CONTINUE, TEMPFAIL, Reply

    assert CONTINUE.encode() == p.encode(p.CONTINUE)
    deferred = "451 4.3.0 Temporary content filter problem; try again later"
    assert TEMPFAIL.encode() == p.encode_replycode(deferred)
    assert Reply.refuse("550", "5.7.1", "no").code == p.REJECT
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Reply.refuse("250", "2.0.0", "fine")
