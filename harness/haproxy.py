"""A real HAProxy (Debian ``haproxy``) on loopback for tests: TCP frontends that pass each
client's address to the server behind them in a PROXY protocol header.

HAProxy runs in the foreground (``-db``) from a configuration in its own temporary
directory, and is stopped by its PID.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.ports import free_port
from harness.process import TestDaemon, file_tail

__all__ = ["HAPROXY", "Frontend", "HAProxy"]

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin")


@dataclass(frozen=True)
class Frontend:
    """One TCP frontend on 127.0.0.1 to ``server_port``; ``proxy`` is ``send-proxy``
    (PROXY protocol v1, text) or ``send-proxy-v2`` (binary)."""

    name: str
    server_port: int
    proxy: str = "send-proxy"


class HAProxy(TestDaemon):
    """``haproxy -db -f CONF`` with the given frontends; ``port(name)`` is where each listens."""

    name = "haproxy"
    stop_timeout = 5.0

    def __init__(self, frontends: Sequence[Frontend]) -> None:
        if HAPROXY is None:
            raise RuntimeError("haproxy not found: apt-get install haproxy")
        self.dir = Path(tempfile.mkdtemp(prefix="mw-haproxy-"))
        self.frontends = list(frontends)
        self.ports = {f.name: free_port() for f in self.frontends}

    def port(self, name: str) -> int:
        """The port the frontend ``name`` listens on."""
        return self.ports[name]

    def config(self) -> str:
        """haproxy.cfg: TCP mode, one frontend and one server (with health checks) each."""
        parts = [
            "global\n  log stdout format raw local0 info\n",
            "defaults\n  mode tcp\n  log global\n  option tcplog\n"
            "  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n",
        ]
        for f in self.frontends:
            parts.append(
                f"frontend fe_{f.name}\n  bind 127.0.0.1:{self.ports[f.name]}\n"
                f"  default_backend be_{f.name}\n"
                f"backend be_{f.name}\n"
                f"  server s1 127.0.0.1:{f.server_port} {f.proxy}"
                " check check-send-proxy inter 1s fall 2 rise 1\n")
        return "".join(parts)

    def start(self) -> HAProxy:
        """Check the configuration (``haproxy -c``), start, and wait until every frontend listens."""
        conf = self.dir / "haproxy.cfg"
        conf.write_text(self.config(), encoding="utf-8")
        self.launch([str(HAPROXY), "-db", "-f", str(conf)], self.dir / "haproxy.log", self._listening,
                    timeout=10)
        return self

    def _listening(self) -> bool:
        for port in self.ports.values():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        return file_tail(self.dir / "haproxy.log", lines)

    def log_text(self) -> str:
        """HAProxy's log (one line per connection, tcplog format)."""
        return (self.dir / "haproxy.log").read_text(errors="replace")
