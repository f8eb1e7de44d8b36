"""Lists of networks from the configuration (trusted clients, internal hosts)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Networks:
    """Membership test for a list of networks (``192.0.2.0/24``, ``2001:db8::/32``, an address)."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __call__(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)

    def contains(self, address: str) -> bool:
        """Whether the address in text form is in one of the networks (junk: no)."""
        if not self.networks:
            return False  # the usual empty list: no address to parse for every message
        try:
            return self(ipaddress.ip_address(address.strip()))
        except ValueError:
            return False
