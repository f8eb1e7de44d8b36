"""POP-before-SMTP windows in the shared store: ``pbs:<ip>`` = subscriber, with a TTL.

Dovecot's login reports open a window (:mod:`policyd.dovecot`); the relay check
reads it.  Because the store is shared, a login on one node opens the window on
every node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from mailwarden.store import Store

PREFIX = "pbs:"


def window_key(client_ip: str) -> str:
    """The store key of an IP's window (IPv6 in compressed form); ValueError for junk."""
    return PREFIX + str(ipaddress.ip_address(client_ip.strip()))


class PopBeforeSmtp:
    """Open, find and close POP-before-SMTP windows."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open(self, client_ip: str, subscriber: str, ttl: float) -> None:
        """Let ``client_ip`` relay as ``subscriber`` for ``ttl`` seconds (a newer login wins)."""
        self.store.set(window_key(client_ip), subscriber, ttl=ttl)

    def lookup(self, client_ip: str) -> str | None:
        """The subscriber whose window is open for ``client_ip``, or None."""
        return self.store.get(window_key(client_ip))

    def close(self, client_ip: str) -> bool:
        """Close a window; False if none was open."""
        return self.store.delete(window_key(client_ip)) > 0

    def windows(self) -> Iterator[tuple[str, str, float | None]]:
        """Every open window as (ip, subscriber, seconds left)."""
        for key in self.store.scan(PREFIX):
            user = self.store.get(key)
            if user is not None:
                yield key[len(PREFIX) :], user, self.store.ttl(key)
