"""Mail address normalisation shared by every lookup."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

MAX_ADDRESS_LENGTH = 320
MAX_LOCAL_LENGTH = 64
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class InvalidAddress(ValueError):
    """An address that cannot be a mailbox; the message says why."""


def normalize_domain(domain: str) -> str:
    """Lower-case a domain, drop a trailing dot and turn IDN labels into A-labels."""
    name = domain.strip().rstrip(".").lower()
    if not name:
        raise InvalidAddress("empty domain")
    if name.startswith("[") and name.endswith("]"):
        return name  # address literal, e.g. [192.0.2.1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidAddress(f"domain {domain!r} is not a valid internationalised name") from None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise InvalidAddress(f"domain {domain!r} is not a valid host name")
    return name


@functools.lru_cache(maxsize=32768)
def normalize_address(address: str) -> str:
    """Return ``local@domain`` with the domain normalised and the local part lower-cased.

    Accepts the ``<...>`` form Postfix passes.  Raises InvalidAddress for anything
    that cannot name a mailbox (empty, no ``@``, control characters, too long).
    Results are cached: the daemons see the same addresses all day.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        raise InvalidAddress("empty address")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"address longer than {MAX_ADDRESS_LENGTH} characters")
    if _SPACE_OR_CONTROL.search(text):
        raise InvalidAddress(f"address {text!r} contains spaces or control characters")
    local, sep, domain = text.rpartition("@")
    if not sep or not local:
        raise InvalidAddress(f"address {text!r} has no local part and domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_LENGTH:
        raise InvalidAddress(f"local part of {text!r} longer than {MAX_LOCAL_LENGTH} octets")
    return f"{local.lower()}@{normalize_domain(domain)}"


def split_address(address: str) -> tuple[str, str]:
    """Split a normalised address into local part and domain."""
    local, _, domain = address.rpartition("@")
    return local, domain


def matching_pattern(address: str, patterns: Iterable[str]) -> str | None:
    """The first ``user@dom`` or ``@dom`` pattern that the normalised ``address`` matches."""
    domain = "@" + split_address(address)[1]
    return next((p for p in patterns if p in (address, domain)), None)
