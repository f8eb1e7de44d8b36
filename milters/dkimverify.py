"""DKIM signature verification: dkimpy's rules, with the costly steps done in C.

dkimpy decides everything about a signature here: its tags and their validity
(``verify_headerprep``), the key record (``evaluate_pk``), the canonicalization
policy, which header fields are signed and how they are hashed (``hash_headers``).
Three steps of its ``DKIM.verify`` are done differently, because they were most of
the milter's CPU per signed message (py-spy on the thread holding the interpreter,
3 KB and 50 KB messages, one RSA-2048 signature each and every fifth an ed25519 one
as well; bench/bench_dkim.py):

* **RSA**: OpenSSL's, through ``cryptography``, where dkimpy computes with Python
  integers (11 % of the busy time).
* **Relaxed body canonicalization**: dkimpy replaces every run of spaces and tabs,
  each single space included, with a regular expression and strips trailing ones
  with another (20 %).  :func:`relaxed_body` finds with ``bytes`` searches whether
  there is anything to change at all and then changes only that: a base64
  attachment has nothing, plain text only its double spaces and tabs.  It gives
  dkimpy's bytes (tests/milter/test_dkimverify.py compares them on generated
  bodies).
* **The parse**: dkimpy splits the whole message, body included, into lines with a
  regular expression and joins the body again (8 %); here only the header block is
  given to dkimpy's parser and the body's line ends are made CRLF with two
  ``bytes.replace``.  Only the header fields a signature names are canonicalized,
  once per signature, where dkimpy canonicalizes all of them.

The body hash is computed once per canonicalization, hash and ``l=`` and shared by
signatures that agree on them (an RSA and an ed25519 signature of one sender).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dkim
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
)
from dkim.crypto import HASH_ALGORITHMS

_HEADER_END = re.compile(rb"\n\r?\n")
_SPACE_RUNS = re.compile(rb" {2,}")
_WHITESPACE = re.compile(rb"\s+")
_PREHASHED: dict[bytes, Callable[[], hashes.HashAlgorithm]] = {
    b"rsa-sha1": hashes.SHA1, b"rsa-sha256": hashes.SHA256, b"ed25519-sha256": hashes.SHA256}
"""The digest an RSA key signs for each ``a=`` (dkimpy checks the key's type, not ``a=``)."""


def split_message(raw: bytes) -> tuple[list[list[bytes]], bytes]:
    """(header fields, body with CRLF line ends) as ``dkim.rfc822_parse`` gives them;
    MessageFormatError where it refuses them (or fails: a folded first line)."""
    if raw.startswith((b"\n", b"\r\n")):
        head, body = b"", raw[1 if raw.startswith(b"\n") else 2:]
    elif (end := _HEADER_END.search(raw)) is None:
        head, body = raw, b""
    else:
        head, body = raw[:end.start() + 1], raw[end.end():]
    if head.startswith((b" ", b"\t")):
        raise dkim.MessageFormatError("the header block starts with a continuation line")
    headers: list[list[bytes]] = dkim.rfc822_parse(head)[0]
    if b"\n" in body:
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return headers, body


def fields_named(headers: list[list[bytes]], names: Iterable[bytes]) -> list[list[bytes]]:
    """The header fields ``names`` (lower case) can select, in message order: the only ones
    worth canonicalizing (``dkim.hash_headers`` then picks among them as among all)."""
    wanted = frozenset(names)
    return [h for h in headers if h[0].lower() in wanted or h[0].lower().rstrip() in wanted]


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 relaxed body canonicalization; the same bytes as dkimpy's."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        body = _SPACE_RUNS.sub(b" ", body)
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    result: bytes = correct_empty_body(strip_trailing_lines(body))
    return result


class SignedMessage:
    """One received message, parsed once for all its signatures."""

    def __init__(self, raw: bytes, *, minkey: int) -> None:
        self.headers, self.body = split_message(raw)
        self.minkey = minkey
        self.parsed = dkim.DKIM(b"", minkey=minkey)
        self.parsed.headers = self.headers
        self.body_hashes: dict[tuple[bytes, Callable[..., Any], bytes | None], bytes] = {}
        """Body hashes by canonicalization, hash function and ``l=``: one per kind asked for."""

    def prepare(self, idx: int) -> tuple[dict[bytes, bytes], list[bytes], tuple[bytes, bytes]] | None:
        """The ``idx``-th signature's tags, the fields it signs and its own field; None if
        there is none.  dkimpy's checks: DKIMException for a malformed signature."""
        prep = self.parsed.verify_headerprep(idx)
        if not prep:
            return None
        sig, include, fields = prep
        name, value = fields[idx]
        return sig, include, (name, value)

    def _body_hash(self, sig: dict[bytes, bytes], policy: CanonicalizationPolicy) -> bytes:
        hasher = HASH_ALGORITHMS[sig[b"a"]]
        key = (policy.body_algorithm.name, hasher, sig.get(b"l"))
        found = self.body_hashes.get(key)
        if found is None:
            body = relaxed_body(self.body) if policy.body_algorithm is Relaxed else \
                policy.canonicalize_body(self.body)
            if b"l" in sig:
                body = body[:int(sig[b"l"])]
            found = self.body_hashes[key] = hasher(body).digest()
        return found

    def verify(self, sig: dict[bytes, bytes], include: list[bytes], field: tuple[bytes, bytes],
               key: PublishedKey) -> bool:
        """Whether the signature verifies with ``key`` (:func:`published_key` of the record);
        dkimpy's exceptions (ValidationError for a body hash mismatch, KeyFormatError for a
        small key that verifies)."""
        if key.tlsrpt_only:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from exc
        if b"bh" in sig:
            try:
                expected = base64.b64decode(_WHITESPACE.sub(b"", sig[b"bh"]))
            except ValueError as exc:
                raise dkim.MessageFormatError(str(exc)) from exc
            got = self._body_hash(sig, policy)
            if got != expected:
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(got)!r}, expected {sig[b'bh']!r})")
        if b"from" in include:
            include = [*include, b"from"]  # as dkimpy: an added From field breaks the signature
        hasher = HASH_ALGORITHMS[sig[b"a"]]()
        dkim.hash_headers(hasher, policy, policy.canonicalize_headers(fields_named(self.headers, include)),
                          include, field, sig)
        signature = base64.b64decode(_WHITESPACE.sub(b"", sig[b"b"]))
        if isinstance(key.public, nacl.signing.VerifyKey):
            try:
                key.public.verify(hasher.digest(), signature)
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        digest = Prehashed(_PREHASHED[sig[b"a"]]())
        try:
            key.public.verify(signature, hasher.digest(), padding.PKCS1v15(), digest)
        except InvalidSignature:
            return False
        if key.bits < self.minkey:
            raise dkim.KeyFormatError(f"public key too small: {key.bits}")
        return True


@dataclass(frozen=True)
class PublishedKey:
    """A DKIM key record as dkimpy reads it, ready to verify with."""

    public: rsa.RSAPublicKey | nacl.signing.VerifyKey
    bits: int
    tlsrpt_only: bool
    """``s=tlsrpt``: the key signs TLS reports only, never mail."""


@functools.lru_cache(maxsize=1024)
def published_key(record: str) -> PublishedKey:
    """The key of a DKIM key record (dkimpy's ``evaluate_pk``), kept for the records most
    recently seen: mail from one sender is signed with one key, and reading an RSA key
    (dkimpy's ASN.1 parse in Python) costs as much as verifying with it.  KeyFormatError
    for a record dkimpy refuses (not kept)."""
    pk, bits, ktag, tlsrpt_only = dkim.evaluate_pk("", record)
    if ktag == b"ed25519":
        return PublishedKey(pk, bits, tlsrpt_only)
    return PublishedKey(rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key(), bits,
                        tlsrpt_only)
