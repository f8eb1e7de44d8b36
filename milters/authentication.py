"""Sender authentication of one message: DKIM signatures (dkimpy) and SPF (pyspf).

Every DNS question goes to mailwarden's resolver (``[dns]``), never /etc/resolv.conf:

* **DKIM.** dkimpy verifies every ``DKIM-Signature`` (RSA and ed25519, ``l=`` and
  oversigned fields as dkimpy treats them).  Its verifier asks for the key through a
  ``dnsfunc``.  The key record is resolved first, on the event loop, with the
  asyncio twin of the configured resolver, and dkimpy is handed a ``dnsfunc`` that
  answers from it.  (dkimpy's own ``asyncsupport`` module takes an async ``dnsfunc``
  too, but it imports aiodns, a second resolver stack, just to be loaded.)  A DNS
  timeout or SERVFAIL gives ``temperror``, never ``pass`` or ``fail``.
* **SPF.** pyspf evaluates the envelope sender (the HELO name for the null sender)
  through :class:`mailwarden.spfquery.ResolverQuery`, whose lookups are the
  configured resolver's blocking ones, so the evaluation runs in the loop's executor.

Results use the names of RFC 8601 (``pass``, ``fail``, ``neutral``, ``none``,
``temperror``, ``permerror``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

import dkim
import dns.resolver
import spf

from mailwarden.dns import async_twin
from mailwarden.dnslookup import resolve_async, resolve_sync
from mailwarden.spfquery import ResolverQuery, pyspf_records
from milters.filters import Envelope

MIN_KEY_BITS = 1024
"""RSA keys shorter than this do not verify (RFC 8301)."""

_QUIET = logging.getLogger("mailwarden.milter.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
_EMPTY_P = re.compile(r"(?:^|;)\s*p\s*=\s*(?:;|$)")


class DnsTempError(Exception):
    """DNS could not answer now (timeout, SERVFAIL): a temporary error, never a verdict."""


class AuthDns:
    """TXT lookups on the event loop and pyspf lookups in a worker thread, both from one
    configured resolver (sharing its answer cache)."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver
        self.aio = async_twin(resolver)

    async def txt(self, name: str) -> list[str]:
        """The TXT strings of ``name`` (each record's strings joined); ``[]`` when there are none."""
        found = await resolve_async(self.aio, name, "TXT")
        if isinstance(found, Exception):
            raise DnsTempError(f"{name}: {type(found).__name__}")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in found]

    def spf_lookup(self, name: str, qtype: str) -> list[Any]:
        """One blocking lookup in pyspf's shape (worker threads only)."""
        found = resolve_sync(self.resolver, name, qtype)
        if isinstance(found, Exception):
            raise spf.TempError(f"DNS {type(found).__name__}")
        return pyspf_records(name, qtype, found)


@dataclass(frozen=True)
class DkimResult:
    """The verdict on one DKIM signature."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip()


async def verify_dkim(raw: bytes, count: int, dns_: AuthDns) -> list[DkimResult]:
    """Verify the ``count`` DKIM signatures of ``raw`` (the message as received), top first."""
    if count == 0:
        return []
    verifier = dkim.DKIM(raw, logger=_QUIET, minkey=MIN_KEY_BITS)
    return [await _verify_one(verifier, idx, dns_) for idx in range(count)]


async def _verify_one(verifier: dkim.DKIM, idx: int, dns_: AuthDns) -> DkimResult:
    try:
        prep = verifier.verify_headerprep(idx)
    except dkim.DKIMException as exc:
        return DkimResult("permerror", reason=f"bad signature: {exc}")
    if not prep:
        return DkimResult("permerror", reason="bad signature")
    sig = prep[0]
    found = DkimResult("pass", _text(sig.get(b"d")).lower(), _text(sig.get(b"s")), _text(sig.get(b"a")))
    name = f"{found.selector}._domainkey.{found.domain}"
    try:
        records = await dns_.txt(name)
    except DnsTempError as exc:
        return _with(found, "temperror", f"key lookup: {exc}")
    if not records:
        return _with(found, "permerror", "no key")
    record = records[0]
    if _EMPTY_P.search(record):
        return _with(found, "permerror", "key revoked")
    try:
        dkim.evaluate_pk(name, record)
    except dkim.DKIMException as exc:
        return _with(found, "permerror", f"bad key: {exc}")
    key = record.encode("utf-8", "replace")
    try:
        ok = verifier.verify(idx, dnsfunc=lambda _name, timeout=5: key)
    except dkim.ValidationError as exc:
        return _with(found, "fail", str(exc).split(" (")[0])
    except dkim.DKIMException as exc:
        return _with(found, "permerror", str(exc))
    return found if ok else _with(found, "fail", "signature did not verify")


def _with(found: DkimResult, result: str, reason: str) -> DkimResult:
    return DkimResult(result, found.domain, found.selector, found.algorithm, reason)


@dataclass(frozen=True)
class SpfResult:
    """SPF of one message: the result and the identity checked."""

    result: str
    domain: str
    """The domain the result is about (MAIL FROM's, or HELO's for the null sender)."""
    identity: str
    """``mailfrom`` or ``helo``."""
    explanation: str = ""


def check_spf(dns_: AuthDns, envelope: Envelope, receiver: str, timeout: float) -> SpfResult:
    """SPF of the envelope sender (blocking: run it in the loop's executor)."""
    client_address, sender, helo = envelope.client_address, envelope.sender, envelope.helo
    identity = "mailfrom" if sender else "helo"
    checked = sender or f"postmaster@{helo}"
    domain = checked.rpartition("@")[2].lower()
    if not client_address or not domain:
        return SpfResult("none", domain, identity, "no client address or sender domain")
    query = ResolverQuery(i=client_address, s=checked, h=helo or domain, receiver=receiver,
                          timeout=timeout, querytime=timeout, lookup=dns_.spf_lookup)
    result, _code, explanation = query.check()
    return SpfResult(str(result), domain, identity, str(explanation))


async def check_spf_async(dns_: AuthDns, envelope: Envelope, receiver: str, timeout: float) -> SpfResult:
    """:func:`check_spf` in the loop's executor."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, check_spf, dns_, envelope, receiver, timeout)
