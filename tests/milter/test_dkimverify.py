"""The DKIM verifier's own steps give dkimpy's answers.

The relaxed body canonicalization and the parse are compared byte for byte with
dkimpy's on generated input; whole verifications with dkimpy's ``DKIM.verify`` on
messages signed in every way dkimpy signs (RSA with SHA-256 and SHA-1, ed25519,
simple and relaxed, ``l=``), and after changes that break or keep a signature.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable

import dkim
import nacl.encoding
import nacl.signing
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.dkimverify import SignedMessage, published_key, relaxed_body, split_message
from milters.signing import public_record

MIN_KEY = 1024


@given(st.binary(max_size=300).map(lambda b: bytes(b" \t\r\nab."[x % 7] for x in b)))
@settings(max_examples=3000)
def test_relaxed_body_is_dkimpys(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


_HEADER_LINE = st.builds(lambda n, v: n + b":" + v,
                         st.sampled_from([b"From", b"To", b"Subject", b"X-A", b"from "]),
                         st.binary(max_size=12).map(lambda b: bytes(b" \tab"[x % 4] for x in b)))
_LINE = st.one_of(_HEADER_LINE, st.sampled_from([b" folded", b"\tfolded", b""]),
                  st.binary(max_size=10).map(lambda b: bytes(b" \t\rxy."[x % 6] for x in b)))


@given(st.lists(_LINE, max_size=12), st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=12, max_size=12))
@settings(max_examples=3000)
def test_the_parse_is_dkimpys(lines: list[bytes], ends: list[bytes]) -> None:
    raw = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    try:
        expected = dkim.rfc822_parse(raw)
    except (dkim.MessageFormatError, IndexError):  # IndexError: a header block that starts folded
        with pytest.raises(dkim.MessageFormatError):
            split_message(raw)
        return
    assert split_message(raw) == expected


def _rsa(bits: int = 2048) -> tuple[bytes, bytes]:
    pem = subprocess.run(["openssl", "genrsa", str(bits)], check=True, capture_output=True).stdout
    return pem, public_record(pem, "rsa-sha256").encode()


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    return _rsa()


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, bytes]:
    seed = nacl.signing.SigningKey.generate()
    public = base64.b64encode(bytes(seed.verify_key)).decode()
    return seed.encode(encoder=nacl.encoding.Base64Encoder), f"v=DKIM1; k=ed25519; p={public}".encode()


MESSAGE = (b"From: Jiro <jiro@sender.example>\r\nTo: taro@example.jp\r\nSubject:  lunch\t on friday \r\n"
           b"Date: Mon, 07 Dec 2026 01:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\n"
           b"Hi Taro,  \r\n\r\nare we\tstill on for lunch?\t\r\n \r\nJiro\r\n\r\n\r\n")

Change = Callable[[bytes], bytes]
CHANGES: dict[str, Change] = {
    "unchanged": lambda m: m,
    "LF line ends": lambda m: m.replace(b"\r\n", b"\n"),
    "whitespace changed in the body": lambda m: m.replace(b"are we\tstill", b"are  we still"),
    "trailing blank lines added": lambda m: m + b"\r\n\r\n",
    "body changed": lambda m: m.replace(b"lunch?", b"dinner?"),
    "text appended": lambda m: m + b"P.S. wire the money\r\n",
    "subject changed": lambda m: m.replace(b"lunch\t on", b"dinner on"),
    "header refolded": lambda m: m.replace(b"Subject:  lunch\t on", b"Subject: lunch\r\n\ton"),
    "second From added": lambda m: b"From: Mallory <m@evil.example>\r\n" + m,
    "unsigned field added": lambda m: b"X-Extra: 1\r\n" + m,
}


def _both(message: bytes, record: bytes) -> tuple[object, object]:
    """(dkimpy's answer, ours) for the first signature of ``message``; an exception's type."""
    def dkimpys() -> object:
        return dkim.DKIM(message, minkey=MIN_KEY).verify(0, dnsfunc=lambda _n, timeout=5: record)

    def ours() -> object:
        signed = SignedMessage(message, minkey=MIN_KEY)
        prep = signed.prepare(0)
        assert prep is not None
        return signed.verify(*prep, published_key(record.decode()))

    answers = []
    for run in (dkimpys, ours):
        try:
            answers.append(run())
        except dkim.DKIMException as exc:
            answers.append(type(exc).__name__)
    return answers[0], answers[1]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize(("kind", "canon", "length"), [
    ("rsa-sha256", b"relaxed/relaxed", False), ("rsa-sha256", b"simple/simple", False),
    ("rsa-sha256", b"relaxed/simple", True), ("rsa-sha1", b"simple/relaxed", False),
    ("ed25519-sha256", b"relaxed/relaxed", False), ("rsa-sha256", b"relaxed/relaxed", True),
])
def test_verification_agrees_with_dkimpy(change: str, kind: str, canon: bytes, length: bool,
                                         rsa_key: tuple[bytes, bytes], ed_key: tuple[bytes, bytes]) -> None:
    private, record = ed_key if kind.startswith("ed") else rsa_key
    header, body = canon.split(b"/")
    field = dkim.sign(MESSAGE, b"sel", b"sender.example", private, canonicalize=(header, body),
                      signature_algorithm=kind.encode(), length=length,
                      include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    expected, got = _both(CHANGES[change](field + MESSAGE), record)
    assert got == expected
    if change == "unchanged":
        assert got is True


def test_a_key_below_the_minimum_is_refused_as_dkimpy_refuses_it() -> None:
    private, record = _rsa(768)
    field = dkim.sign(MESSAGE, b"sel", b"sender.example", private)
    assert _both(field + MESSAGE, record) == ("KeyFormatError", "KeyFormatError")
    changed = MESSAGE.replace(b"lunch?", b"tea?")
    assert _both(field + changed, record) == ("ValidationError", "ValidationError")


def test_a_wrong_key_fails_and_two_signatures_share_one_body_hash(
        rsa_key: tuple[bytes, bytes], ed_key: tuple[bytes, bytes]) -> None:
    other = _rsa()[1]
    field = dkim.sign(MESSAGE, b"sel", b"sender.example", rsa_key[0])
    assert _both(field + MESSAGE, other) == (False, False)
    both = dkim.sign(MESSAGE, b"ed", b"sender.example", ed_key[0], signature_algorithm=b"ed25519-sha256")
    signed = SignedMessage(both + field + MESSAGE, minkey=MIN_KEY)
    for idx, record in ((0, ed_key[1]), (1, rsa_key[1])):
        prep = signed.prepare(idx)
        assert prep is not None and signed.verify(*prep, published_key(record.decode())) is True
    assert len(signed.body_hashes) == 1  # one canonicalization, SHA-256, no l=: one body hash for both
    assert signed.prepare(2) is None
