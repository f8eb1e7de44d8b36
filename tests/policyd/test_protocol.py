"""The policy protocol parser: limits, bad input, and a bounded fuzz."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.protocol import (
    Malformed,
    PolicyRequest,
    RequestLimits,
    RequestReader,
    format_reply,
    format_request,
    validate,
)
from tests.policyd.conftest import request

REQ = format_request(request())


def test_complete_request_parses_to_attributes() -> None:
    (got,) = RequestReader().feed(REQ)
    assert isinstance(got, PolicyRequest)
    assert got.recipient == "taro@example.jp"
    assert got.stage == "RCPT"
    assert validate(got) is None


def test_request_split_byte_by_byte_gives_the_same_answer() -> None:
    reader = RequestReader()
    out = []
    for i in range(len(REQ)):
        out += reader.feed(REQ[i : i + 1])
    assert len(out) == 1 and isinstance(out[0], PolicyRequest)
    assert out[0].attrs == request()


def test_pipelined_requests_come_out_in_order() -> None:
    two = b"".join(format_request(request(recipient=r)) for r in ("a@example.jp", "b@example.jp"))
    got = RequestReader().feed(two)
    assert [r.recipient for r in got if isinstance(r, PolicyRequest)] == ["a@example.jp", "b@example.jp"]


def test_crlf_line_ends_are_tolerated() -> None:
    (got,) = RequestReader().feed(REQ.replace(b"\n", b"\r\n"))
    assert isinstance(got, PolicyRequest) and got.sender == "someone@outside.example"


def test_no_terminating_blank_line_yields_nothing_yet() -> None:
    reader = RequestReader()
    assert reader.feed(REQ[:-1]) == []
    assert reader.pending == len(REQ) - 1


def test_over_long_line_is_malformed_and_the_next_request_still_parses() -> None:
    reader = RequestReader(RequestLimits(max_line_length=100, max_request_size=4096))
    bad = format_request(request(helo_name="x" * 200))
    got = reader.feed(bad + REQ)
    assert isinstance(got[0], Malformed) and "longer than 100" in got[0].reason
    assert isinstance(got[1], PolicyRequest)


def test_over_long_request_is_discarded_with_bounded_memory() -> None:
    reader = RequestReader(RequestLimits(max_request_size=1000, max_line_length=100))
    junk = b"a=" + b"b" * 99 + b"\n"
    out = []
    for _ in range(500):  # 50 kB of a request that never ends
        out += reader.feed(junk)
        assert len(reader._buf) <= 1001
    assert out == []
    assert reader.discarded > 40000
    out = reader.feed(b"\n" + REQ)
    assert isinstance(out[0], Malformed) and "longer than 1000 bytes" in out[0].reason
    assert isinstance(out[1], PolicyRequest)
    assert reader.discarded == 0


def test_too_many_attributes_is_malformed() -> None:
    attrs = request(**{f"x{i}": "1" for i in range(200)})
    (got,) = RequestReader().feed(format_request(attrs))
    assert isinstance(got, Malformed) and "attributes" in got.reason


def test_non_utf8_value_is_malformed() -> None:
    (got,) = RequestReader().feed(b"request=smtpd_access_policy\nhelo_name=\xff\xfe\n\n")
    assert isinstance(got, Malformed) and "not UTF-8" in got.reason


def test_line_without_equals_is_malformed() -> None:
    (got,) = RequestReader().feed(b"request=smtpd_access_policy\nGET / HTTP/1.0\n\n")
    assert isinstance(got, Malformed) and "name=value" in got.reason


def test_unknown_attributes_are_kept_and_ignored() -> None:
    (got,) = RequestReader().feed(format_request(request(future_attribute="42")))
    assert isinstance(got, PolicyRequest) and validate(got) is None
    assert got["future_attribute"] == "42"


def test_wrong_request_type_and_stage_are_named() -> None:
    assert validate(PolicyRequest({"request": "junk", "protocol_state": "RCPT"})) is not None
    assert "protocol_state" in (validate(PolicyRequest({"request": "smtpd_access_policy"})) or "")


def test_number_attribute_tolerates_junk() -> None:
    req = PolicyRequest({"size": "12345", "recipient_count": "-3"})
    assert req.number("size") == 12345 and req.number("recipient_count") == 0
    assert PolicyRequest({"size": "9" * 40}).number("size") == 0


def test_reply_cannot_be_split_by_newlines_in_the_text() -> None:
    assert format_reply("550 5.7.1 a\nb\r\nc") == b"action=550 5.7.1 a b  c\n\n"


# ---------------------------------------------------------------- fuzz

attr_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20)
attr_value = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(attr_name, attr_value, min_size=1, max_size=20),
       st.lists(st.integers(1, 64), max_size=30))
def test_fuzz_any_valid_request_in_any_chunking_round_trips(attrs: dict[str, str], cuts: list[int]) -> None:
    data = format_request(attrs) * 2
    reader = RequestReader()
    out: list[PolicyRequest | Malformed] = []
    pos = 0
    for size in cuts:
        out += reader.feed(data[pos : pos + size])
        pos += size
    out += reader.feed(data[pos:])
    assert len(out) == 2
    for got in out:
        assert isinstance(got, PolicyRequest) and got.attrs == attrs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_fuzz_arbitrary_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    limits = RequestLimits(max_line_length=64, max_request_size=256, max_attributes=8)
    reader = RequestReader(limits)
    terminators = 0
    for chunk in chunks:
        for got in reader.feed(chunk):
            assert isinstance(got, PolicyRequest | Malformed)
            terminators += 1
        assert len(reader._buf) <= limits.max_request_size + 200
    assert terminators <= sum(c.count(b"\n") for c in chunks)


ODD_LINES = [b"a=1", b"=x", b"noeq", b"name=\xff", b"\xc3\xa9=v", b"k=\xe3\x81\x82", b"x" * 70 + b"=1",
             b"sender=<a@b>"]


def _outcome(got: PolicyRequest | Malformed) -> object:
    return got.attrs if isinstance(got, PolicyRequest) else got


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(ODD_LINES), st.binary(max_size=40)), max_size=12))
def test_fuzz_fast_parse_agrees_with_the_strict_parse(lines: list[bytes]) -> None:
    reader = RequestReader(RequestLimits(max_line_length=64, max_request_size=4096, max_attributes=8))
    block = b"\n".join(line.replace(b"\n", b"") for line in lines)
    assert _outcome(reader._parse(block)) == _outcome(reader._parse_strict(block))
