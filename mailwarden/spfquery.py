"""pyspf's ``query`` with its DNS answered by mailwarden's resolver, never /etc/resolv.conf.

Shared by the policy daemon's SPF check (answers resolved on the event loop,
``policyd/checks/spf.py``) and the milter's sender authentication (a blocking lookup
run in the loop's executor, ``milters/authentication.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import spf

from mailwarden.dnslookup import DnsRecords

Lookup = Callable[[str, str], list[Any]]


class ResolverQuery(spf.query):  # type: ignore[misc]  # pyspf has no type hints
    """``spf.query`` whose DNS questions go to ``lookup(name, qtype)``.

    pyspf asks DNS in one place, the public :meth:`spf.query.dns`; every other
    lookup (TXT, MX, A/AAAA, PTR, exists, include) goes through it.  This override
    keeps that method's contract - the per-query cache of every answer, CNAME
    chains up to ``spf.MAX_CNAME``, the void-lookup limit of RFC 7208 4.6.4, the
    ``querytime`` budget - and asks ``lookup`` instead of the module's
    ``DNSLookup``, which stays untouched.  ``lookup`` returns pyspf's shape,
    ``[((name, type), value), ...]`` (see :func:`pyspf_records`), and raises
    ``spf.TempError`` when DNS cannot answer.
    """

    def __init__(self, *args: Any, lookup: Lookup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dns_lookup = lookup

    def dns(self, name: str, qtype: str, cnames: dict[str, str] | None = None,
            ignore_void: bool = False) -> list[Any]:
        """Answer ``name``/``qtype`` from the cache or ``lookup`` (pyspf's ``query.dns``)."""
        if not name:
            raise spf.PermError("invalid DNS name: empty")
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # an invalid DNS name (a label too long or empty) has no records
        name = name.lower()
        result: list[Any] = self.cache.get((name, qtype), [])
        if result:
            return result
        cname_key = (name, "CNAME")
        cname = self.cache.get(cname_key)
        if cname:
            cname = cname[0]
        else:
            if self.querytime < 0:
                raise spf.TempError("DNS Error: exceeded max query lookup time")
            started = time.time()
            for (owner, rtype), value in self.dns_lookup(name, qtype):
                # DNS servers answer with any case: the cache is case-insensitive.
                key = (owner.lower(), rtype)
                if key == cname_key:
                    cname = value
                    result = self.cache.get((cname, qtype), [])
                    if result:
                        break
                if key[1] == "CNAME" or (qtype, key[1]) in spf.query.SAFE2CACHE:
                    self.cache.setdefault(key, []).append(value)
            result = self.cache.get((name, qtype), [])
            if self.querytime > 0:
                self.querytime -= time.time() - started
        if not result and cname:
            if not cnames:
                cnames = {}
            elif len(cnames) >= spf.MAX_CNAME:
                raise spf.PermError(f"Length of CNAME chain exceeds {spf.MAX_CNAME}")
            cnames[name] = cname
            if cname.lower().rstrip(".") in cnames:
                if self.strict > 1:
                    raise spf.AmbiguityWarning("CNAME loop", cname)
            else:
                result = self.dns(cname, qtype, cnames=cnames)
                if result:
                    self.cache[(name, qtype)] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def pyspf_records(name: str, qtype: str, records: DnsRecords) -> list[Any]:
    """dnspython rdata in the shape pyspf's DNSLookup returns."""
    out: list[Any] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out



