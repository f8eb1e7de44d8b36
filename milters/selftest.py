"""The milter's probes for ``mailwarden selftest`` (registered through its Section).

Each one uses the backend as the milter does: clamd scans EICAR over INSTREAM with
the milter's client, spamd or rspamd (whichever ``milter.spam_engine`` names; the
other row says it is not used) scores GTUBE with the milter's client, the re-injection
smtpd is greeted and asked for what re-injection needs (XFORWARD), and each DKIM
key that exists is read and its public record derived.
"""

from __future__ import annotations

import asyncio
import glob
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

from mailwarden.config import Config
from mailwarden.endpoint import Endpoint
from mailwarden.selftest import ProbeFailed, Status
from milters.config import MilterConfig

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
_GTUBE_MESSAGE = (b"From: selftest@mailwarden.invalid\r\nTo: selftest@mailwarden.invalid\r\n"
                  b"Subject: mailwarden selftest\r\nMessage-ID: <selftest@mailwarden.invalid>\r\n\r\n"
                  + GTUBE + b"\r\n")
GTUBE_SCORE = 1000.0
"""SpamAssassin scores GTUBE 1000."""


def _clamd(config: Config) -> str:
    from milters.scanners import ScanError, VirusResult
    from milters.scanners.clamd import ClamdScanner

    m = MilterConfig.of(config)
    where = ", ".join(m.clamd)

    async def scan() -> VirusResult:
        scanner = ClamdScanner(m.clamd, timeout=m.clamd_timeout)
        try:
            return await scanner.scan(lambda: [EICAR], time.monotonic() + m.clamd_timeout)
        finally:
            scanner.close()

    try:
        result = asyncio.run(scan())
    except ScanError as exc:
        raise ProbeFailed(str(exc) or where, "is clamd running? check [milter] clamd (and for a unix "
                          "socket, that the milter's user may open it)") from None
    if not result.infected:
        raise ProbeFailed(f"{result.upstream}: EICAR not found", "clamd has no usable signatures: "
                          "run freshclam and check clamd's DatabaseDirectory", Status.MISCONFIGURED)
    return f"{result.upstream}: EICAR found ({result.signature})"


def _spamd(config: Config) -> str:
    from milters.scanners import ScanError
    from milters.scanners.spamd import SpamdScanner

    m = MilterConfig.of(config)
    if m.spam_engine != "spamd":
        return f"not used (spam_engine = {m.spam_engine})"
    where = ", ".join(m.spamd)
    scanner = SpamdScanner(m.spamd, timeout=m.spamd_timeout, user=m.spamd_user)
    try:
        result = asyncio.run(scanner.check(_GTUBE_MESSAGE, time.monotonic() + m.spamd_timeout))
    except ScanError as exc:
        raise ProbeFailed(str(exc).rstrip(": ") or where,
                          "is spamd running? check [milter] spamd and spamd's --allowed-ips") from None
    if result.score < GTUBE_SCORE:
        raise ProbeFailed(f"{result.upstream}: GTUBE scored {result.score:g}", "spamd's rules are missing "
                          "or GTUBE is switched off: run sa-update and check local.cf", Status.MISCONFIGURED)
    return f"{result.upstream}: GTUBE scored {result.score:g}"


def _rspamd(config: Config) -> str:
    from milters.scanners import ScanError, SpamResult
    from milters.scanners.rspamd import RspamdScanner

    m = MilterConfig.of(config)
    if m.spam_engine != "rspamd":
        return f"not used (spam_engine = {m.spam_engine})"
    where = ", ".join(m.rspamd)

    async def check() -> SpamResult:
        scanner = RspamdScanner(m.rspamd, timeout=m.rspamd_timeout)
        try:
            return await scanner.check(_GTUBE_MESSAGE, time.monotonic() + m.rspamd_timeout)
        finally:
            await scanner.close()

    try:
        result = asyncio.run(check())
    except ScanError as exc:
        raise ProbeFailed(str(exc).rstrip(": ") or where,
                          "is rspamd running? check [milter] rspamd (a normal or proxy worker's "
                          "bind_socket)") from None
    if "GTUBE" not in result.symbols:
        raise ProbeFailed(f"{result.upstream}: GTUBE not recognised (score {result.score:g})",
                          "rspamd's GTUBE check is off (options gtube_patterns) or the rules are "
                          "missing", Status.MISCONFIGURED)
    return f"{result.upstream}: GTUBE scored {result.score:g}"


def _reinject(config: Config) -> str:
    m = MilterConfig.of(config)
    endpoint = Endpoint.parse(m.reinject)
    hint = ("is Postfix running with the re-injection smtpd in master.cf? check [milter] reinject "
            "(mailwarden render postfix writes the service)")
    try:
        with smtplib.SMTP(timeout=min(m.reinject_timeout, 10.0)) as smtp:
            code, banner = smtp.connect(endpoint.where, endpoint.port)
            if code != 220:
                raise ProbeFailed(f"{endpoint}: greeting {code} {banner.decode(errors='replace')}", hint)
            smtp.ehlo()
            xforward = smtp.has_extn("xforward")
            smtp.quit()
    except (OSError, smtplib.SMTPException) as exc:
        raise ProbeFailed(f"{endpoint}: {exc or type(exc).__name__}", hint) from None
    if not xforward:
        raise ProbeFailed(f"{endpoint}: answers, but offers no XFORWARD to this host",
                          "set smtpd_authorized_xforward_hosts on the re-injection smtpd (without it "
                          "Postfix's log does not link a re-injected copy to its message)",
                          Status.MISCONFIGURED)
    return f"{endpoint}: ESMTP with XFORWARD"


def _dkim(config: Config) -> str:
    from milters.signing import ED25519_SUFFIX, SigningUnavailable, public_record

    template = MilterConfig.of(config).dkim_key_path
    pattern = template.replace("{domain}", "*").replace("{selector}", "*")
    paths = sorted(Path(p) for p in glob.glob(pattern))  # noqa: PTH207 (the pattern may be anywhere)
    for path in paths:
        algorithm = "ed25519-sha256" if ED25519_SUFFIX in path.name else "rsa-sha256"
        try:
            public_record(path.read_bytes(), algorithm)
        except (OSError, SigningUnavailable, ValueError, TypeError) as exc:
            raise ProbeFailed(f"{path}: not a usable {algorithm} key ({exc})",
                              "replace it: mailwarden dkim keygen DOMAIN SELECTOR (after removing it), "
                              "and check that the milter's user may read it", Status.MISCONFIGURED) from None
    if not paths:
        return f"no keys yet ({pattern})"
    return f"{len(paths)} key(s) readable ({pattern})"


def probes() -> list[tuple[str, Callable[[Config], str]]]:
    """The milter's backends, as ``mailwarden selftest`` rows."""
    return [("clamd", _clamd), ("spamd", _spamd), ("rspamd", _rspamd), ("reinject", _reinject),
            ("dkim", _dkim)]
