"""An authoritative stub DNS server on loopback, for SPF, DKIM and DNSBL tests.

Records come from a dict (``{"example.jp": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}}``);
names listed in ``servfail`` answer SERVFAIL and names in ``silent`` never answer
(a resolver timeout).  Anything else is NXDOMAIN.  Serves UDP and TCP on 127.0.0.1.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from harness.ports import free_port

Records = Mapping[str, Mapping[str, Iterable[str]]]


def _key(name: str | dns.name.Name) -> str:
    return str(name).rstrip(".").lower()


class StubDns:
    """Start with ``start()`` (or ``with``); point resolvers at ``127.0.0.1:port``."""

    def __init__(
        self, records: Records | None = None, *, servfail: Iterable[str] = (),
        silent: Iterable[str] = (), port: int | None = None,
    ) -> None:
        self.records: dict[str, dict[str, list[str]]] = {}
        for name, rrs in (records or {}).items():
            for rtype, values in rrs.items():
                self.add(name, rtype, *values)
        self.servfail = {_key(n) for n in servfail}
        self.silent = {_key(n) for n in silent}
        self.port = port or free_port()
        self.queries: list[tuple[str, str]] = []
        self._servers: list[socketserver.BaseServer] = []

    def add(self, name: str, rtype: str, *values: str) -> None:
        """Add records (``add("example.jp", "TXT", '"v=spf1 -all"')``)."""
        self.records.setdefault(_key(name), {}).setdefault(rtype.upper(), []).extend(values)

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent."""
        query = dns.message.from_wire(wire)
        reply = dns.message.make_response(query)
        reply.flags |= 0x0400  # AA
        if not query.question:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply.to_wire()
        q = query.question[0]
        name, rtype = _key(q.name), dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rtype))
        if name in self.silent:
            return None
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        node = self.records.get(name)
        if node is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        values = node.get(rtype, [])
        if values:
            reply.answer.append(
                dns.rrset.from_text_list(q.name, 300, dns.rdataclass.IN, rtype, values)
            )
        return reply.to_wire()

    def servers(self, listen: str = "127.0.0.1") -> tuple[socketserver.BaseServer, socketserver.BaseServer]:
        """A UDP and a TCP server answering from the records on ``listen`` (not yet serving)."""
        stub = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = stub.answer(data)
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return  # a connection closed without a query (rspamd opens TCP sockets early)
                out = stub.answer(self.rfile.read(int.from_bytes(head, "big")))
                if out is not None:
                    self.wfile.write(len(out).to_bytes(2, "big") + out)

        class UdpServer(socketserver.ThreadingUDPServer):
            allow_reuse_address = True
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        return UdpServer((listen, self.port), Udp), TcpServer((listen, self.port), Tcp)

    def start(self) -> StubDns:
        """Serve UDP and TCP on loopback in background threads."""
        self._servers = list(self.servers())
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> StubDns:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


