"""Sender authentication of one message: DKIM signatures (dkimpy), SPF (pyspf), DMARC and ARC.

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

* **DMARC** (RFC 7489, with ``np`` of RFC 9091).  The policy record of the From
  domain, else of its organizational domain, comes from the configured resolver.  The
  organizational domain is found with the Public Suffix List that the
  ``publicsuffixlist`` package ships (updated with each release of it; nothing is
  downloaded at run time).  Records are parsed by the ``dmarc`` package
  (``dmarc.Policy.parse_record``: the ``v``/``p`` order, tag values, defaults, ``t=y``),
  chosen over ``authheaders`` because that one resolves with its own DNS and its own
  copy of the list, synchronously.  Alignment and the choice of ``p``/``sp``/``np`` are
  done here: the ``dmarc`` package counts any parent or child domain as aligned in
  relaxed mode (RFC 7489 asks for the same organizational domain) and has no ``np``.

* **ARC** (RFC 8617).  dkimpy validates the chain of ARC sets.  Like a DKIM
  verification, every key its seals and message signatures name is resolved first, on
  the event loop, and dkimpy's ``dnsfunc`` answers from those records.  The latest
  set's sealer and the ``dmarc=`` result it recorded are kept, so a recipient domain
  that trusts that sealer (``arc_trusted_sealers``) can let its chain override a DMARC
  fail (a mailing list that rewrote the message after a genuine pass).

Results use the names of RFC 8601 (``pass``, ``fail``, ``neutral``, ``none``,
``temperror``, ``permerror``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from functools import partial
from typing import Any

import authres
import dkim
import dmarc
import dns.exception
import dns.resolver
import spf
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from mailwarden.dns import async_twin
from mailwarden.dnslookup import cached_records, resolve_async, resolve_sync
from mailwarden.metrics import Backend, Timer
from mailwarden.spfquery import ResolverQuery, pyspf_records
from milters.dkimverify import SignedMessage, published_key
from milters.filters import Envelope
from milters.message import Message

MIN_KEY_BITS = 1024
"""RSA keys shorter than this do not verify (RFC 8301)."""
INLINE_DKIM = 256 * 1024
"""Signed messages up to this size are verified on the event loop, larger ones in its executor."""
ORGANIZATIONAL_KEPT = 4096
"""Organizational domains remembered per process (the memo is emptied when full)."""

DKIMPY_LOG = logging.getLogger("mailwarden.milter.dkimpy")
"""Where dkimpy's own messages go: nowhere (the milter logs one line per message)."""
DKIMPY_LOG.addHandler(logging.NullHandler())
DKIMPY_LOG.propagate = False
_EMPTY_P = re.compile(r"(?:^|;)\s*p\s*=\s*(?:;|$)")


class DnsTempError(Exception):
    """DNS could not answer now (timeout, SERVFAIL): a temporary error, never a verdict."""


class NotCached(Exception):
    """An answer the resolver's cache does not hold (asking for it would block)."""


class AuthDns:
    """TXT lookups on the event loop and pyspf lookups in a worker thread, both from one
    configured resolver (sharing its answer cache)."""

    def __init__(self, resolver: dns.resolver.Resolver, backend: Backend | None = None) -> None:
        self.resolver = resolver
        self.aio = async_twin(resolver)
        self.backend = backend
        """Times the lookups (metrics on), else None."""

    def _timed(self) -> Timer | contextlib.nullcontext[None]:
        return self.backend.timed() if self.backend is not None else contextlib.nullcontext()

    async def txt(self, name: str) -> list[str]:
        """The TXT strings of ``name`` (each record's strings joined); ``[]`` when there are none.

        An answer in the resolver's cache is taken from it directly: a full (cached)
        resolution builds its query state first, which cost more than the rest of the
        DMARC evaluation."""
        found = cached_records(self.resolver, name, "TXT")
        if found is None:
            with self._timed():
                asked = await resolve_async(self.aio, name, "TXT")
                if isinstance(asked, Exception):
                    raise DnsTempError(f"{name}: {type(asked).__name__}")
            found = asked
        return [b"".join(r.strings).decode("utf-8", "replace") for r in found]

    async def exists(self, name: str) -> bool:
        """Whether ``name`` exists in DNS at all (RFC 9091: not NXDOMAIN for A, AAAA and MX)."""
        for rdtype in ("A", "AAAA", "MX"):
            with self._timed():
                try:
                    await self.aio.resolve(name, rdtype, search=False, raise_on_no_answer=False)
                except dns.resolver.NXDOMAIN:
                    continue
                except dns.exception.DNSException as exc:
                    raise DnsTempError(f"{name}: {type(exc).__name__}") from None
            return True
        return False

    def cached_spf_lookup(self, name: str, qtype: str) -> list[Any]:
        """A lookup in pyspf's shape answered from the resolver's cache alone (on the loop);
        NotCached when the answer is not there."""
        found = cached_records(self.resolver, name, qtype)
        if found is None:
            raise NotCached(f"{name}/{qtype}")
        return pyspf_records(name, qtype, found)

    def spf_lookup(self, name: str, qtype: str) -> list[Any]:
        """One blocking lookup in pyspf's shape (worker threads only)."""
        with self._timed():
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


async def verify_dkim(message: Message, dns_: AuthDns) -> list[DkimResult]:
    """Verify every DKIM signature of ``message`` (as received), top first.

    The parse, canonicalization and hashing of a message over :data:`INLINE_DKIM` bytes
    run in the loop's executor, so that a large message does not hold every other session
    of the worker; a smaller one is verified on the loop, where the hand-offs to a thread
    would cost more than the work.  Unsigned mail costs nothing here.
    """
    count = sum(1 for name, _ in message.headers if name.lower() == "dkim-signature")
    if count == 0:
        return []
    raw = message.raw()
    inline = len(raw) <= INLINE_DKIM
    parse = partial(SignedMessage, raw, minkey=MIN_KEY_BITS)
    try:
        signed = parse() if inline else await asyncio.get_running_loop().run_in_executor(None, parse)
    except dkim.DKIMException as exc:
        return [DkimResult("permerror", reason=f"bad message: {exc}")] * count
    return [await _verify_one(signed, idx, dns_, inline) for idx in range(count)]


async def _verify_one(signed: SignedMessage, idx: int, dns_: AuthDns, inline: bool) -> DkimResult:
    try:
        prep = signed.prepare(idx)
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
        key = published_key(record)
    except dkim.DKIMException as exc:
        return _with(found, "permerror", f"bad key: {exc}")
    verify = partial(signed.verify, *prep, key)
    try:
        ok = verify() if inline else await asyncio.get_running_loop().run_in_executor(None, verify)
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


def check_spf(dns_: AuthDns, envelope: Envelope, receiver: str, timeout: float,
              lookup: Callable[[str, str], list[Any]] | None = None) -> SpfResult:
    """SPF of the envelope sender (blocking: run it in the loop's executor), its DNS asked
    through ``lookup`` (the resolver by default)."""
    client_address, sender, helo = envelope.client_address, envelope.sender, envelope.helo
    identity = "mailfrom" if sender else "helo"
    checked = sender or f"postmaster@{helo}"
    domain = checked.rpartition("@")[2].lower()
    if not client_address or not domain:
        return SpfResult("none", domain, identity, "no client address or sender domain")
    query = ResolverQuery(i=client_address, s=checked, h=helo or domain, receiver=receiver,
                          timeout=timeout, querytime=timeout, lookup=lookup or dns_.spf_lookup)
    result, _code, explanation = query.check()
    return SpfResult(str(result), domain, identity, str(explanation))


async def check_spf_async(dns_: AuthDns, envelope: Envelope, receiver: str, timeout: float) -> SpfResult:
    """:func:`check_spf` on the loop when the resolver's cache holds every answer it needs
    (most mail: a sender's SPF records are asked again within their TTL), else in the
    loop's executor, which asks DNS.  The evaluation is the same either way; the hand-off
    to a thread and back was a tenth of the milter's busy time for signed mail."""
    missing: list[str] = []

    def cached(name: str, qtype: str) -> list[Any]:
        try:
            return dns_.cached_spf_lookup(name, qtype)
        except NotCached as exc:
            missing.append(str(exc))  # pyspf swallows errors in places (exp=): noted here too
            raise

    with contextlib.suppress(NotCached):
        found = check_spf(dns_, envelope, receiver, timeout, lookup=cached)
        if not missing:
            return found
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, check_spf, dns_, envelope, receiver, timeout)


# ---------------------------------------------------------------- DMARC

_DMARC_RECORD = re.compile(r"^\s*v\s*=\s*DMARC1\s*(?:;|$)")
_NP = re.compile(r"(?:^|;)\s*np\s*=\s*(none|quarantine|reject)\s*(?:;|$)", re.IGNORECASE)
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True)
class DmarcResult:
    """DMARC of the RFC5322.From domain."""

    result: str
    """``pass``, ``fail``, ``none`` (no policy), ``temperror`` or ``permerror``."""
    domain: str = ""
    policy: str = ""
    """The published policy that applies (``p``, ``sp`` or ``np``): none, quarantine, reject."""
    applied: str = ""
    """``policy`` after ``pct`` sampling (a message not sampled gets the next weaker one)."""
    reason: str = ""


def from_domain(values: list[bytes]) -> str | None:
    """The one domain of the From field(s); None when there is not exactly one."""
    if len(values) != 1:
        return None
    addresses = [a for _, a in getaddresses([values[0].decode("utf-8", "replace")]) if "@" in a]
    domains = {a.rpartition("@")[2].strip().rstrip(".").lower() for a in addresses}
    return domains.pop() if len(domains) == 1 and "" not in domains else None


class Dmarc:
    """Policy discovery and evaluation for one process (the Public Suffix List is loaded once)."""

    def __init__(self, dns_: AuthDns, *, psl: PublicSuffixList | None = None,
                 sample: Callable[[int], int] = random.randrange) -> None:
        self.dns = dns_
        self.psl = psl or PublicSuffixList()
        self.sample = sample
        self._organizational: dict[str, str] = {}

    def organizational(self, domain: str) -> str:
        """The organizational domain (the public suffix plus one label), remembered for
        the domains most recently asked about: a message asks for the same few several
        times, and each list lookup encodes the name label by label."""
        found = self._organizational.get(domain)
        if found is None:
            if len(self._organizational) >= ORGANIZATIONAL_KEPT:
                self._organizational.clear()
            found = self._organizational[domain] = str(self.psl.privatesuffix(domain) or domain)
        return found

    def aligned(self, identifier: str, domain: str, mode: str) -> bool:
        """``s``: the same domain; ``r``: the same organizational domain."""
        if not identifier:
            return False
        identifier = identifier.lower().rstrip(".")
        if identifier == domain:
            return True
        return mode != "s" and self.organizational(identifier) == self.organizational(domain)

    async def _record(self, domain: str) -> str | None:
        found = [r for r in await self.dns.txt(f"_dmarc.{domain}") if _DMARC_RECORD.match(r)]
        return found[0] if len(found) == 1 else None

    async def evaluate(self, domain: str | None, spf_result: SpfResult | None,
                       dkim_results: list[DkimResult]) -> DmarcResult:
        """DMARC of ``domain`` given the SPF and DKIM results of the message."""
        if not domain:
            return DmarcResult("permerror", reason="not exactly one From domain")
        organizational = self.organizational(domain)
        try:
            record = await self._record(domain)
            at_org = record is None and organizational != domain
            if at_org:
                record = await self._record(organizational)
            if record is None:
                return DmarcResult("none", domain)
            policy = dmarc.Policy("DMARC1", domain, organizational if at_org else None)
            try:
                policy.parse_record(record, strict=False)
            except dmarc.Error as exc:
                return DmarcResult("permerror", domain, reason=str(exc))
            if self._passes(domain, policy, spf_result, dkim_results):
                return DmarcResult("pass", domain, policy.p.value, "none")
            chosen = policy.p.value
            if at_org:
                np = _NP.search(record)
                if np and not await self.dns.exists(domain):
                    chosen = np.group(1).lower()
                elif policy.sp is not dmarc.DMARCDisposition.UNSPECIFIED:
                    chosen = policy.sp.value
        except DnsTempError as exc:
            return DmarcResult("temperror", domain, reason=str(exc))
        unknown = self._unknown(domain, policy, spf_result, dkim_results)
        if unknown:
            # An aligned identifier that DNS could not check might have passed.
            return DmarcResult("temperror", domain, chosen, chosen, reason=unknown)
        applied = chosen if policy.pct >= 100 or self.sample(100) < policy.pct else _WEAKER[chosen]
        return DmarcResult("fail", domain, chosen, applied)

    def _passes(self, domain: str, policy: Any, spf_result: SpfResult | None,
                dkim_results: list[DkimResult]) -> bool:
        if any(r.result == "pass" and self.aligned(r.domain, domain, policy.adkim.value)
               for r in dkim_results):
            return True
        return (spf_result is not None and spf_result.result == "pass"
                and self.aligned(spf_result.domain, domain, policy.aspf.value))

    def _unknown(self, domain: str, policy: Any, spf_result: SpfResult | None,
                 dkim_results: list[DkimResult]) -> str:
        """Why an aligned identifier is undecided (a DNS temporary error), or ``""``."""
        for r in dkim_results:
            if r.result == "temperror" and self.aligned(r.domain, domain, policy.adkim.value):
                return f"dkim temperror for {r.domain}"
        if (spf_result is not None and spf_result.result == "temperror"
                and self.aligned(spf_result.domain, domain, policy.aspf.value)):
            return f"spf temperror for {spf_result.domain}"
        return ""


# ---------------------------------------------------------------- ARC

_ARC_FIELDS = ("arc-seal", "arc-message-signature")


@dataclass(frozen=True)
class ArcResult:
    """The ARC chain of a message: ``none``, ``pass``, ``fail`` or ``temperror``."""

    result: str
    sets: int = 0
    """ARC sets validated (the chain's length when it passes)."""
    reason: str = ""
    sealer: str = ""
    """The domain that sealed the latest set (``d=`` of its ARC-Seal), when the chain passes."""
    sealer_dmarc: str = ""
    """The DMARC result the latest sealer recorded in its ARC-Authentication-Results."""

    def vouches(self, trusted: tuple[str, ...]) -> bool:
        """A valid chain whose latest sealer is in ``trusted`` and recorded ``dmarc=pass``.

        Only the latest set counts: its ARC-Message-Signature is the one that must
        verify, so the message is as that sealer passed it on.
        """
        return self.result == "pass" and self.sealer in trusted and self.sealer_dmarc == "pass"


_AAR_INSTANCE = re.compile(r"^\s*i\s*=\s*([0-9]+)\s*;(.*)$", re.DOTALL)


def recorded_dmarc(message: Message, instance: int) -> str:
    """The ``dmarc=`` result in the ARC-Authentication-Results of set ``instance`` (``""``: none)."""
    for name, value in message.headers:
        if name.lower() != "arc-authentication-results":
            continue
        match = _AAR_INSTANCE.match(value.decode("utf-8", "replace"))
        if not match or int(match.group(1)) != instance:
            continue
        try:
            parsed = authres.all_features().parse_value(match.group(2))
        except authres.AuthResError:
            return ""
        return next((str(r.result).lower() for r in parsed.results if r.method == "dmarc"), "")
    return ""


def _arc_key_names(message: Message) -> set[str]:
    names: set[str] = set()
    for name, value in message.headers:
        if name.lower() not in _ARC_FIELDS:
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue  # dkimpy reports the broken set
        selector, domain = _text(tags.get(b"s")), _text(tags.get(b"d")).lower()
        if selector and domain:
            names.add(f"{selector}._domainkey.{domain}")
    return names


async def verify_arc(message: Message, dns_: AuthDns) -> ArcResult:
    """Validate the message's ARC chain (dkimpy), keys resolved through ``dns_`` first."""
    names = _arc_key_names(message)
    if not names:
        return ArcResult("none")
    records: dict[str, bytes] = {}
    try:
        for name in sorted(names):
            found = await dns_.txt(name)
            records[name] = found[0].encode("utf-8", "replace") if found else b""
    except DnsTempError as exc:
        return ArcResult("temperror", reason=f"key lookup: {exc}")

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        return records.get(name.decode("ascii", "replace").rstrip(".").lower(), b"")

    def validate() -> tuple[bytes | None, list[dict[str, Any]], str]:
        chain = dkim.ARC(message.raw(), logger=DKIMPY_LOG, minkey=MIN_KEY_BITS)
        cv, results, reason = chain.verify(dnsfunc=lookup)
        return cv, results, str(reason)

    cv, results, reason = await asyncio.get_running_loop().run_in_executor(None, validate)
    sets = len(results)
    if cv == dkim.CV_Pass:
        latest = results[0]
        return ArcResult("pass", sets, sealer=_text(latest.get("as-domain")).lower(),
                         sealer_dmarc=recorded_dmarc(message, int(latest["instance"])))
    if cv == dkim.CV_None:
        return ArcResult("none", reason=reason)
    return ArcResult("fail", sets, reason)
