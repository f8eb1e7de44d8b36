"""rspamd for tests and benchmarks: Debian's daemon on loopback with network checks off.

:class:`RspamdServer` writes its own top-level ``rspamd.conf`` (Debian's shipped
rules and module defaults under ``/etc/rspamd``, local overrides in a temp
directory), starts ``/usr/bin/rspamd`` in the foreground as ``_rspamd`` and stops it
by its PID.  Network checks are off: the modules that only ask outside services
(DNS blocklists, SURBL, fuzzy hashes, ASN, DCC, the URL redirector, rule updates)
are disabled, multimap's remote maps are dropped, and rspamd's resolver is the
stub DNS given (harness/dnsstub.py) so that SPF, DKIM, DMARC and the HELO
checks see only what a test puts there, and the remote maps other modules name
fail at once instead of leaving the machine.  DKIM signing is off (no keys).  No
Redis: the modules that need it (Bayes, ratelimit, greylisting, reputation, neural)
stay off.

The normal worker answers the HTTP protocol (``/checkv2``) on ``port`` and on a unix
socket.  With
``proxy=True`` a proxy worker in milter mode scans itself (``self_scan``) on
``proxy_port`` and on a unix socket: rspamd alone as a Postfix milter; ``clamd`` adds rspamd's
antivirus module pointed at that clamd (rspamd's own virus path, for comparison
runs; mailwarden does not use it).

Hyperscan databases are compiled once into ``hs_cache`` (shared by every run on
the machine) instead of on every start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from harness.ports import free_port
from harness.process import TestDaemon, file_tail

__all__ = ["RSPAMD", "RspamdServer", "RspamdServerError"]

RSPAMD = shutil.which("rspamd", path="/usr/bin:/usr/sbin:" + os.environ.get("PATH", ""))
USER = "_rspamd"
HS_CACHE = Path(tempfile.gettempdir()) / "mailwarden-rspamd-hs"

# Modules whose whole work is asking services on the internet.
NETWORK_MODULES = ("rbl", "surbl", "emails", "fuzzy_check", "asn", "dcc", "url_redirector",
                   "rspamd_update", "mx_check", "external_services", "p0f", "bimi")
# Modules with nothing to do here: no keys to sign with.
IDLE_MODULES = ("dkim_signing",)


class RspamdServerError(RuntimeError):
    """rspamd could not be started."""


class RspamdServer(TestDaemon):
    """A private rspamd on 127.0.0.1 (normal worker, optionally a self-scanning milter proxy)."""

    name = "rspamd"
    stop_timeout = 15.0

    def __init__(self, dns_port: int, *, workers: int = 1, proxy: bool = False, proxy_workers: int = 1,
                 clamd: str = "", reject_score: float = 15.0, startup_timeout: float = 120.0) -> None:
        if RSPAMD is None:
            raise RspamdServerError("rspamd not installed (apt-get install rspamd)")
        self.dir = Path(tempfile.mkdtemp(prefix="mw-rspamd-"))
        self.dir.chmod(0o755)
        self.dns_port = dns_port
        self.port = free_port()
        self.proxy_port = free_port() if proxy else 0
        self.workers = workers
        self.proxy_workers = proxy_workers
        self.clamd = clamd
        self.reject_score = reject_score
        self.startup_timeout = startup_timeout
        self._write_config()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port`` of the normal worker."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        """The normal worker's unix socket."""
        return self.dir / "run" / "normal.sock"

    @property
    def unix_address(self) -> str:
        """``unix:/path`` of the normal worker, for ``milter.rspamd``."""
        return f"unix:{self.socket_path}"

    @property
    def address(self) -> str:
        """``inet:127.0.0.1:port`` of the normal worker, for ``milter.rspamd``."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def proxy_socket_path(self) -> Path:
        """The milter proxy's unix socket."""
        return self.dir / "run" / "proxy.sock"

    @property
    def milter_unix_address(self) -> str:
        """``unix:/path`` of the milter proxy, for Postfix's ``smtpd_milters``."""
        return f"unix:{self.proxy_socket_path}"

    @property
    def milter_address(self) -> str:
        """``inet:127.0.0.1:port`` of the milter proxy, for Postfix's ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.proxy_port}"

    def _write_config(self) -> None:
        local = self.dir / "local.d"
        override = self.dir / "override.d"
        for d in (local, override, self.dir / "db", self.dir / "run", HS_CACHE):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, USER, USER)
        workers = [
            f'worker "normal" {{\n  bind_socket = "127.0.0.1:{self.port}";\n'
            f'  bind_socket = "{self.socket_path} mode=0666";\n'
            f'  .include "$CONFDIR/worker-normal.inc"\n  count = {self.workers};\n}}\n'
        ]
        if self.proxy_port:
            workers.append(
                f'worker "rspamd_proxy" {{\n  bind_socket = "127.0.0.1:{self.proxy_port}";\n'
                f'  bind_socket = "{self.proxy_socket_path} mode=0666";\n'
                f"  milter = yes;\n  timeout = 120s;\n  count = {self.proxy_workers};\n"
                '  spam_header = "X-Spam";\n  reject_message = "Spam message rejected";\n'
                '  upstream "local" {\n    default = yes;\n    self_scan = yes;\n  }\n}\n')
        (self.dir / "rspamd.conf").write_text(
            '.include "$CONFDIR/common.conf"\n'
            "options {\n"
            '  pidfile = "$RUNDIR/rspamd.pid";\n'
            '  .include "$CONFDIR/options.inc"\n'
            '  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"\n'
            "}\n"
            'logging {\n  type = "file";\n  filename = "$LOGDIR/rspamd.log";\n  level = "notice";\n}\n'
            + "".join(workers))
        (local / "options.inc").write_text(
            f'dns {{\n  nameserver = ["127.0.0.1:{self.dns_port}"];\n'
            "  timeout = 1s;\n  retransmits = 1;\n}\n"
            f'hs_cache_dir = "{HS_CACHE}";\n'
            'control_socket = "$DBDIR/rspamd.sock mode=0600";\n'
            "disable_monitoring = true;\n")
        (local / "actions.conf").write_text(f"reject = {self.reject_score};\n")
        for module in NETWORK_MODULES + IDLE_MODULES:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        (override / "multimap.conf").write_text("# remote freemail/redirector maps dropped\n")
        if self.clamd:
            (local / "antivirus.conf").write_text(
                "clamav {\n  type = \"clamav\";\n  symbol = \"CLAM_VIRUS\";\n  action = \"reject\";\n"
                f'  servers = "{self.clamd}";\n  scan_mime_parts = false;\n  timeout = 30s;\n'
                "  retransmits = 1;\n}\n")
        for path in self.dir.rglob("*"):
            shutil.chown(path, USER, USER)

    def log_tail(self, lines: int = 20) -> str:
        """The end of rspamd's log (console output when it did not get that far)."""
        return file_tail(self.dir / "rspamd.log", lines) or file_tail(self.dir / "console.log", lines)

    def ping(self) -> bool:
        """Whether the normal worker answers ``/ping``."""
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1.0) as reply:  # noqa: S310 - loopback
                return bool(reply.read().strip() == b"pong")
        except OSError:
            return False

    def start(self) -> RspamdServer:
        """Start rspamd and wait until the normal worker answers."""
        if self.pid is not None:
            return self
        assert RSPAMD is not None
        args = [
            RSPAMD, "-f", "-u", USER, "-g", USER, "-c", str(self.dir / "rspamd.conf"),
            "--var", f"LOCAL_CONFDIR={self.dir}", "--var", f"DBDIR={self.dir / 'db'}",
            "--var", f"RUNDIR={self.dir / 'run'}", "--var", f"LOGDIR={self.dir}",
        ]
        self.launch(args, self.dir / "console.log", self.ping, timeout=self.startup_timeout,
                    error=RspamdServerError)
        return self
