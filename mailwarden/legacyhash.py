"""Password hashes taken over from a legacy mail system's passwd file.

A qmail-era system (vpopmail, checkpassword, Courier's userdb) keeps ``user:hash[:...]``
lines with crypt(3) strings (DES, ``$1$`` MD5, ``$5$`` / ``$6$`` SHA, bcrypt) or
``{SCHEME}`` prefixed ones.  Each becomes a subscriber's ``legacy_password`` as
``{SCHEME}hash`` in a scheme Dovecot verifies, so the passdb step needs no default scheme.
A string that is none of these (a locked ``*`` / ``!`` account, a plain password, an
unknown scheme) is refused: storing it would lock the subscriber out or keep a password
in clear.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

__all__ = ["LegacyUser", "PasswdError", "normalize_hash", "parse_passwd", "scheme_of"]

_B64 = r"[./0-9A-Za-z]"
CRYPT_FORMS: tuple[tuple[str, str], ...] = (
    (rf"\$1\$[^$:]{{0,8}}\${_B64}{{22}}", "MD5-CRYPT"),
    (rf"\$5\$(rounds=[0-9]+\$)?[^$:]{{0,16}}\${_B64}{{43}}", "SHA256-CRYPT"),
    (rf"\$6\$(rounds=[0-9]+\$)?[^$:]{{0,16}}\${_B64}{{86}}", "SHA512-CRYPT"),
    (rf"\$2[abxy]\$[0-9]{{2}}\${_B64}{{53}}", "CRYPT"),  # bcrypt, through crypt(3)
    (rf"{_B64}{{13}}", "CRYPT"),  # traditional DES
)
"""crypt(3) strings as passwd files hold them, and the Dovecot scheme that verifies each."""

SALTED_DIGESTS = {"SSHA": 20, "SSHA256": 32, "SSHA512": 64}
"""Salted digest schemes: base64 of the digest (this many bytes) followed by the salt."""

SCHEMES = ("CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", *SALTED_DIGESTS)
"""The schemes a legacy hash may be stored in."""


class PasswdError(ValueError):
    """A passwd line or hash that cannot be taken over (the message says why)."""


def _crypt_scheme(text: str) -> str | None:
    for pattern, scheme in CRYPT_FORMS:
        if re.fullmatch(pattern, text):
            return scheme
    return None


def normalize_hash(text: str) -> str:
    """``{SCHEME}hash`` for a passwd file's hash; PasswdError when Dovecot could not verify it."""
    value = text.strip()
    if not value or value in ("*", "!", "!!", "x") or value.startswith(("!", "*")):
        raise PasswdError(f"{value or '(empty)'!r} is a locked or empty password, not a hash")
    match = re.fullmatch(r"\{([A-Za-z0-9.-]+)\}(.+)", value)
    if match is None:
        scheme = _crypt_scheme(value)
        if scheme is None:
            raise PasswdError(f"{value[:8]}...: not a crypt(3) hash (DES, $1$, $5$, $6$, $2y$) "
                              "nor {SCHEME}hash")
        return f"{{{scheme}}}{value}"
    scheme, rest = match.group(1).upper(), match.group(2)
    if scheme not in SCHEMES:
        raise PasswdError(f"{{{scheme}}}: not a scheme taken over ({', '.join(SCHEMES)})")
    if scheme in SALTED_DIGESTS:
        try:
            raw = base64.b64decode(rest, validate=True)
        except (binascii.Error, ValueError):
            raise PasswdError(f"{{{scheme}}}: not base64") from None
        if len(raw) <= SALTED_DIGESTS[scheme]:
            raise PasswdError(f"{{{scheme}}}: {len(raw)} bytes, too short for a salted digest")
        return f"{{{scheme}}}{rest}"
    found = _crypt_scheme(rest)
    if found is None or scheme not in ("CRYPT", found):
        raise PasswdError(f"{{{scheme}}}: {rest[:8]}... is not a {scheme} string")
    return f"{{{scheme}}}{rest}"


def scheme_of(stored: str) -> str:
    """The ``{SCHEME}`` of a stored hash, to show it without the hash itself."""
    match = re.match(r"\{[A-Za-z0-9.-]+\}", stored)
    return match.group(0) if match else "{CRYPT}"


@dataclass(frozen=True)
class LegacyUser:
    """One passwd line taken over: its line number, the address and the hash to store."""

    line: int
    address: str
    hashed: str


def parse_passwd(text: str, domain: str) -> tuple[list[LegacyUser], list[str]]:
    """The users of a passwd-style file for ``domain`` and one error per bad line.

    A line is ``user:hash[:...]`` (more fields are ignored); ``user`` is the local part
    or the whole address in ``domain``.  Blank lines and ``#`` comments are skipped."""
    users: list[LegacyUser] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    domain = domain.lower()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip().lower()
        if not sep or not name:
            errors.append(f"line {number}: not user:hash")
            continue
        local, at, where = name.partition("@")
        if at and where != domain:
            errors.append(f"line {number}: {name} is not in {domain}")
            continue
        if not re.fullmatch(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}", local):
            errors.append(f"line {number}: {name!r} is not a mailbox name")
            continue
        address = f"{local}@{domain}"
        if address in seen:
            errors.append(f"line {number}: {address} again (first on line {seen[address]})")
            continue
        seen[address] = number
        try:
            users.append(LegacyUser(number, address, normalize_hash(rest.split(":", 1)[0])))
        except PasswdError as exc:
            errors.append(f"line {number}: {address}: {exc}")
    return users, errors
