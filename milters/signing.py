"""DKIM signing of mail that subscribers submit, for domains with ``dkim_signing``, and ARC
sealing of mail their subscribers forward.

Submitted means: with SMTP AUTH, from a client with an open POP-before-SMTP window
(``milter.pop_before_smtp``), or from ``milter.internal_networks``.  Who is signed for:
the message's one From domain, when the envelope sender's effective policy has
``dkim_signing`` on and the From domain is that domain or one of its aliases.  The
policy daemon has already checked that an SMTP AUTH login may use the envelope sender;
for a POP-before-SMTP window the window's subscriber must own it here.  So a subscriber
cannot have another domain's mail signed.  The selector is the domain's ``dkim_selector``.

Keys: ``milter.dkim_key_path`` with ``{domain}`` and ``{selector}`` names the RSA key
(PEM).  The ed25519 key (base64 seed, as ``mailwarden dkim keygen --type ed25519``
writes) belongs to the companion selector ``SELECTOR-ed25519``, since one DNS name
holds one key.  Whatever exists of the two is used, both signatures when both exist.
A message to be signed whose keys are missing or unreadable is deferred (451), with one
log line naming the file: mail a domain wants signed never leaves unsigned.

ARC sealing (RFC 8617): a delivered recipient whose effective policy forwards
(``forward_addresses``) and whose domain has ``dkim_signing`` and ``arc_seal_forwards``
on gets its copy sealed by that domain, with the RSA key of its ``dkim_selector``
(dkimpy seals with RSA only).  The seal is added where the message arrives, not where
the mailbox host's Sieve script sends the copy on: only here are the results of the
original hop known first-hand (the copy the mailbox host hands back is mail from our
own network, judged again it would fail SPF).  The ARC-Authentication-Results field
repeats our Authentication-Results field; the chain status (``cv``) is its ``arc=``.
The recipients who share a copy share its seal (the ARC set on a copy that stays in a
mailbox harms nothing), so sealing never splits a message into more copies.  A
forwarding domain whose key is missing gets its copy unsealed, with a warning: a seal
helps the copy along, its absence loses nothing.

When: last, on each content variant as it leaves (the queued copy after the milter's
own header and body changes, each re-injected copy as sent), so the signature covers
every change mailwarden makes.  Hashing runs in the loop's executor.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from mailwarden.catalogue import Service
from mailwarden.directory import DirectoryUnavailable
from mailwarden.policy import AddressKind, PolicyResolver
from milters.authentication import DKIMPY_LOG, from_domain
from milters.dkimverify import fields_named, relaxed_body, split_message
from milters.filters import INTERNAL, Envelope
from milters.message import Message
from milters.verdict import Action, RecipientOutcome

log = logging.getLogger("mailwarden.milter")

ED25519_SUFFIX = "-ed25519"
"""The ed25519 key of selector S is published and kept under selector ``S-ed25519``."""
SIGNED_HEADERS = (b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
                  b"mime-version", b"content-type", b"content-transfer-encoding", b"in-reply-to",
                  b"references", b"list-id", b"list-unsubscribe")


class SigningUnavailable(Exception):
    """The message must be signed and cannot be (a key is missing, the directory is down)."""


def key_path(template: str, domain: str, selector: str) -> Path:
    """Where the key of ``domain`` and ``selector`` is kept."""
    return Path(template.format(domain=domain, selector=selector))


@dataclass(frozen=True)
class SigningKey:
    """One private key and the selector and algorithm it signs with."""

    selector: str
    algorithm: str
    """``rsa-sha256`` or ``ed25519-sha256``."""
    key: bytes


@dataclass(frozen=True)
class Signer:
    """What signs one message: the domain and its keys."""

    domain: str
    keys: tuple[SigningKey, ...]

    def header_fields(self, data: bytes) -> list[str]:
        """``DKIM-Signature`` values (folded with LF) for the complete message ``data``."""
        values = []
        for key in self.keys:
            if key.algorithm == "rsa-sha256":
                value = rsa_signature(data, key, self.domain)
            else:
                field = dkim.sign(data, key.selector.encode(), self.domain.encode(), key.key,
                                  canonicalize=(b"relaxed", b"relaxed"), include_headers=list(SIGNED_HEADERS),
                                  signature_algorithm=key.algorithm.encode(), logger=DKIMPY_LOG)
                name, _, text = field.decode("ascii").partition(":")
                assert name.lower() == "dkim-signature"
                value = text.strip()
            values.append(value.replace("\r\n", "\n"))
        return values


_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@functools.lru_cache(maxsize=256)
def _rsa_key(pem: bytes) -> rsa.RSAPrivateKey | None:
    """The loaded key, kept: loading checks the key (about 30 ms for RSA-2048), signing
    with it takes a fraction of a millisecond.  Keyed by the file's bytes, so a replaced
    key file is loaded afresh."""
    private = serialization.load_pem_private_key(pem, password=None)
    return private if isinstance(private, rsa.RSAPrivateKey) else None


def rsa_signature(data: bytes, key: SigningKey, domain: str) -> str:
    """An ``rsa-sha256``, ``c=relaxed/relaxed`` DKIM-Signature value for ``data`` (CRLF folded).

    dkimpy parses the header block, canonicalizes the header fields and hashes them (its
    public ``rfc822_parse``, ``CanonicalizationPolicy`` and ``hash_headers``); the body is
    parsed and canonicalized as for verification (:mod:`milters.dkimverify`, which says
    why), and the RSA operation is OpenSSL's, through ``cryptography``.  Measured reason: dkimpy's own
    RSA is pure Python, about 7 ms per RSA-2048 signature on this machine class against
    0.27 ms with OpenSSL, which held one milter worker to about 75 signed messages a
    second (bench/bench_dkim.py).  The result verifies with dkimpy and with OpenDKIM
    (tests/milter/test_signing.py).
    """
    private = _rsa_key(key.key)
    if private is None:
        raise SigningUnavailable(f"DKIM key of selector {key.selector} is not an RSA key")
    headers, body = split_message(data)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    include = list(SIGNED_HEADERS)
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"), (b"d", domain.encode()),
              (b"i", b"@" + domain.encode()), (b"q", b"dns/txt"), (b"s", key.selector.encode()),
              (b"t", str(int(time.time())).encode()), (b"h", b" : ".join(include)), (b"bh", body_hash),
              (b"b", b"")]
    unsigned: bytes = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(b"DKIM-Signature"))
    hasher = hashlib.sha256()
    signed = _RELAXED.canonicalize_headers(fields_named(headers, include))
    dkim.hash_headers(hasher, _RELAXED, signed, include, (b"DKIM-Signature", b" " + unsigned), {})
    raw = private.sign(hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    signature = base64.b64encode(raw)
    # b= last, folded on lines of its own (whitespace in b= is ignored by every verifier).
    folded = b"".join(b"\r\n\t" + signature[i:i + 72] for i in range(0, len(signature), 72))
    return (unsigned + folded).decode("ascii")




@dataclass(frozen=True)
class Sealer:
    """What seals one copy: the forwarding domain, its RSA key and our authserv-id."""

    domain: str
    key: SigningKey
    authserv_id: str

    def header_fields(self, data: bytes) -> list[tuple[str, str]]:
        """The ARC set (name, value folded with LF) for the complete message ``data``; empty
        when ``data`` has no Authentication-Results field of ours (nothing to attest)."""
        # Only the fields present: a hop of ours may add a missing one (Postfix adds Date to
        # mail Sieve hands it), which an oversigned absence would turn into a broken seal.
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        present = {line.partition(b":")[0].strip().lower() for line in head if line[:1] not in (b" ", b"\t")}
        try:
            fields = dkim.arc_sign(data, self.key.selector.encode(), self.domain.encode(), self.key.key,
                                   self.authserv_id.encode(),
                                   include_headers=[h for h in SIGNED_HEADERS if h in present],
                                   logger=DKIMPY_LOG)
        except dkim.DKIMException as exc:
            log.warning("ARC seal of %s skipped: %s", self.domain, exc)
            return []
        found = []
        for line in fields:
            name, _, value = line.decode("ascii").partition(":")
            found.append((name.strip(), value.strip().replace("\r\n", "\n")))
        return found


def load_keys(template: str, domain: str, selector: str) -> tuple[SigningKey, ...]:
    """The RSA and ed25519 keys that exist for ``domain``/``selector`` (blocking: files).

    Raises SigningUnavailable naming the file when neither exists or one cannot be read.
    """
    found: list[SigningKey] = []
    rsa = key_path(template, domain, selector)
    ed = key_path(template, domain, selector + ED25519_SUFFIX)
    for path, sel, algorithm in ((rsa, selector, "rsa-sha256"), (ed, selector + ED25519_SUFFIX,
                                                                 "ed25519-sha256")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SigningUnavailable(f"DKIM key {path} unreadable: {exc.strerror}") from None
        found.append(SigningKey(sel, algorithm, data.strip() if algorithm.startswith("ed") else data))
    if not found:
        raise SigningUnavailable(f"DKIM key {rsa} missing")
    return tuple(found)


class Signing:
    """Decides, per message, whether and with which keys it is signed, and which
    recipients' copies are sealed (with ``authserv_id``: whose results a seal attests)."""

    def __init__(self, resolver: PolicyResolver, key_template: str, authserv_id: str = "") -> None:
        self.resolver = resolver
        self.key_template = key_template
        self.authserv_id = authserv_id

    async def sealers_for(self, outcomes: list[RecipientOutcome], queue_id: str) -> dict[str, Sealer]:
        """The sealer of each delivered recipient whose copy is sealed, by address."""
        found: dict[str, Sealer] = {}
        if not self.authserv_id:
            return found
        loop = asyncio.get_running_loop()
        for outcome in outcomes:
            policy = outcome.policy
            if (outcome.action is not Action.DELIVER or policy.kind is not AddressKind.SUBSCRIBER
                    or not policy.enabled(Service.DKIM_SIGNING) or not policy.get("arc_seal_forwards")
                    or not policy.get("forward_addresses")):
                continue
            domain, selector = policy.domain or "", str(policy.get("dkim_selector"))
            try:
                keys = await loop.run_in_executor(None, load_keys, self.key_template, domain, selector)
                rsa = next(k for k in keys if k.algorithm == "rsa-sha256")
            except (SigningUnavailable, StopIteration):
                log.warning("%s: ARC seal of %s for %s skipped: no RSA key %s", queue_id or "NOQUEUE",
                            domain, outcome.address,
                            key_path(self.key_template, domain, selector or "(no dkim_selector)"))
                continue
            found[outcome.address] = Sealer(domain, rsa, self.authserv_id)
        return found

    async def signer_for(self, envelope: Envelope, message: Message) -> Signer | None:
        """The signer of this message, or None when it is not signed.

        Raises SigningUnavailable when it must be signed and cannot be.
        """
        if not envelope.submitted or not envelope.sender:
            return None
        domain = from_domain([v for n, v in message.headers if n.lower() == "from"])
        if domain is None:
            return None
        try:
            policy = await self.resolver.lookup(envelope.sender)
            if envelope.submitter not in ("", INTERNAL):
                # POP-before-SMTP: the window's subscriber must own the sender, as an SMTP
                # AUTH login must (the policy daemon checks logins, not windows).
                owner = await self.resolver.lookup(envelope.submitter)
                if not owner.owns_sender(envelope.sender):
                    return None
        except DirectoryUnavailable as exc:
            raise SigningUnavailable(f"directory unavailable: {exc}") from None
        except ValueError:
            return None
        if not policy.is_local or not policy.enabled(Service.DKIM_SIGNING):
            return None
        if domain != policy.domain and domain not in policy.domain_aliases:
            return None
        selector = str(policy.get("dkim_selector")) if "dkim_selector" in policy.settings else ""
        if not selector:
            raise SigningUnavailable(f"no dkim_selector for {policy.domain}")
        loop = asyncio.get_running_loop()
        keys = await loop.run_in_executor(None, load_keys, self.key_template, domain, selector)
        return Signer(domain, keys)


# ---------------------------------------------------------------- keys and their records

RSA_BITS = 2048


def _openssl(*args: str, data: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SigningUnavailable(f"openssl {args[0]} failed: {exc}") from None
    return done.stdout


def public_record(private: bytes, algorithm: str) -> str:
    """The DNS TXT record (``v=DKIM1; k=...; p=...``) that publishes ``private``'s public key."""
    if algorithm.startswith("ed25519"):
        seed = nacl.signing.SigningKey(private.strip(), encoder=nacl.encoding.Base64Encoder)
        public = seed.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
        return f"v=DKIM1; k=ed25519; p={public}"
    der = _openssl("pkey", "-pubout", "-outform", "DER", data=private)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def generate_key(kind: str) -> tuple[bytes, str]:
    """A new private key (RSA-2048 PEM or an ed25519 base64 seed) and its algorithm."""
    if kind == "ed25519":
        seed = nacl.signing.SigningKey.generate()
        return seed.encode(encoder=nacl.encoding.Base64Encoder), "ed25519-sha256"
    return _openssl("genrsa", str(RSA_BITS)), "rsa-sha256"


def write_new_key(path: Path, private: bytes) -> None:
    """Write a key file readable by its owner only; an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)


def zone_txt(value: str) -> str:
    """A TXT value in zone-file form: quoted strings of at most 255 characters each (an
    RSA-2048 key's record is about 400), which DNS servers join back into one record."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, max(len(value), 1), 255))


def published_key(record: str) -> str:
    """The ``p=`` value of a DKIM key record, whitespace removed (empty when there is none)."""
    for tag in record.split(";"):
        name, _, value = tag.partition("=")
        if name.strip() == "p":
            return "".join(value.split())
    return ""
