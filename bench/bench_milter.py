"""Content filtering through one private Postfix, side by side in one run:

* Postfix alone (no milter);
* clamav-milter alone, and mailwarden for subscribers who contract only virus scanning;
* the peer stack clamav-milter + spamass-milter (which scans every message with spamd);
* mailwarden where 30 % of recipients contract spam checking and all contract virus scanning;
* mailwarden where every recipient contracts both;
* mailwarden on the virus-only path again with ``milter.workers = 2`` (two processes on
  one socket);
* mailwarden on the virus-only path again where every recipient's domain archives: each
  message is saved in the archive mailbox's Dovecot before it is accepted (the mailbox
  role as ``mailwarden render dovecot`` writes it, run here), with IMAP MULTIAPPEND as
  the archive master user, and once more over LMTP (``archive_imap_port = 0``);
* clamav-milter and mailwarden on the virus-only path again, with arrivals spread out at
  the rate the previous variant reached (spamd's pace): CPU per message on a quiet node;
  and what the same small task costs the machine right after an idle pause, against
  back to back, in Python and in C.

Same clamd (unix socket, local signatures) and same spamd (unix socket, 2 children,
network tests off) for everyone; mailwarden's sender authentication asks a stub DNS on
loopback (remote.example's SPF record passes the load generator); Postfix relays to
Postfix's own ``smtp-sink``. The load is one message per SMTP session, ``--sessions`` in
parallel, each body unique (no scan-cache hits), 3 % carrying EICAR and 3 % GTUBE, after
one warm-up message per recipient (a warm policy cache). The virus-only domain sends no
virus notices, as clamav-milter here does not; the others keep the default (a notice to
the recipient). Reported per variant: injection and end-to-end msg/s (until Postfix's
queue is empty), end-of-data latency p50/p99 (from the final dot to the reply), the CPU
time per message of the milters, clamd, spamd and the archive's Dovecot (each in a
cgroup of its own where the kernel offers one, to the microsecond), and peak RSS. A
verdict check then sends the same small set through the peer stack and through
mailwarden to a recording sink and compares refusals and spam flags where the services
are the same.

Needs root, postfix, clamav-daemon, spamd, clamav-milter, spamass-milter, dovecot (core,
lmtpd, ldap, sieve).
Usage: python -m bench.bench_milter [--quick] [--sessions 20] [--repeat N] [--variants KEY,...]
Prints a table and one JSON line.  ``--variants virus-only,archived`` runs only those
(keys: see ``--help``), round by round, and prints each round and the ratios within it.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from harness.clamd import EICAR, ClamdServer
from harness.cpumeter import CpuMeter, peak_rss_mb, process_tree
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.process import stop_process
from harness.scrape import Scraper
from harness.slapd import SERVICE_BIND, SlapdServer, mailwarden_database
from harness.smtpsink import SmtpSink
from harness.spamd import GTUBE, SpamdServer
from tests.render.conftest import RenderedDovecot, Site, ldap_toml

USERS = 100
DOMAINS = {  # domain -> (services for every user, services for users with i % 10 < 3)
    "mix.example": (["virus-scan"], ["spam-check"]),
    "all.example": (["virus-scan", "spam-check"], []),
    "quiet.example": (["virus-scan", "spam-check"], []),
    "av.example": (["virus-scan"], []),
    "arch.example": (["virus-scan", "archive"], []),
    "none.example": ([], []),
}
DOMAIN_SETTINGS = {
    # The virus-only comparison: clamav-milter here refuses infected mail and notifies
    # no one, so this domain chooses no notices either (each would be one more message
    # through Postfix).
    "av.example": ["mwNoticeRecipient: none"],
    # Everyone contracts all, and no notices: bench/bench_rspamd.py's comparison with
    # rspamd alone as the milter, which notifies no one.
    "quiet.example": ["mwNoticeRecipient: none"],
    # The same path, archived: every message is kept in the domain's archive mailbox.
    "arch.example": ["mwNoticeRecipient: none", "mwArchiveAddress: archive@arch.example"],
}
ARCHIVED = "mailwarden, virus only, archived"
ARCHIVED_LMTP = "mailwarden, virus only, archived over LMTP"
ARCHIVED_2 = "mailwarden, virus only, archived, 2 IMAP sessions"
ARCHIVED_MAILDIR = "mailwarden, virus only, archived in a Maildir"
ALL = "mailwarden, everyone contracts all"
PACED_CLAM = "clamav-milter (virus only), paced"
PACED_WARDEN = "mailwarden, virus only, paced"
FILLER = (
    "Dear colleague,\n\nplease find below the minutes of Tuesday's meeting. We agreed to move the\n"
    "release to the second week of the month and to review the open tickets on Friday.\n"
    "The budget figures will follow once finance has confirmed them.\n\n"
)


# ---------------------------------------------------------------- directory


def bench_ldif(path: Path) -> Path:
    """Four domains of USERS subscribers each; in mix.example 30 % contract spam checking."""
    base = "ou=domains,dc=mailwarden,dc=test"
    out: list[str] = []
    for domain, (everyone, some) in DOMAINS.items():
        ddn = f"mwDomainName={domain},{base}"
        out += [f"dn: {ddn}", "objectClass: mwDomain", f"mwDomainName: {domain}",
                *(f"mwEnabledService: {s}" for s in everyone), *DOMAIN_SETTINGS.get(domain, []), ""]
        out += [f"dn: ou=users,{ddn}", "objectClass: organizationalUnit", "ou: users", ""]
        for i in range(USERS):
            out += [f"dn: uid=u{i:03d},ou=users,{ddn}", "objectClass: inetOrgPerson",
                    "objectClass: mwSubscriber", f"uid: u{i:03d}", f"cn: User {i}", "sn: User",
                    f"mail: u{i:03d}@{domain}"]
            if i % 10 < 3:
                out += [f"mwEnabledService: {s}" for s in some]
            out.append("")
        if "archive" in everyone:
            out += [f"dn: uid=archive,ou=users,{ddn}", "objectClass: inetOrgPerson",
                    "objectClass: mwSubscriber", "uid: archive", "cn: Archive", "sn: Archive",
                    f"mail: archive@{domain}", "mwAccountStatus: archive", ""]
    path.write_text("\n".join(out) + "\n")
    return path


# ---------------------------------------------------------------- messages


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


_RANDOM = random.Random()


def minutes(n: int, sender: str, rcpt: str, extra: str = "", rng: random.Random = _RANDOM) -> EmailMessage:
    """Message ``n``: a few KB of meeting minutes (``extra`` appended), unique by a random reference."""
    msg = EmailMessage()
    msg["From"] = f"Sender {n} <{sender}>"
    msg["To"] = rcpt
    msg["Subject"] = f"minutes #{n}"
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = f"<bench-{n}-{rng.getrandbits(40):x}@{sender.partition('@')[2]}>"
    msg.set_content(f"{FILLER * 8}ref {n} {rng.getrandbits(64):x}\n{extra}")
    return msg


def make_message(kind: str, n: int, rcpt: str) -> bytes:
    msg = minutes(n, f"sender{n}@remote.example", rcpt, GTUBE + "\n" if kind == "gtube" else "")
    if kind == "eicar":
        msg.add_attachment(zipped("report.com", EICAR), maintype="application", subtype="zip",
                           filename=f"report-{n}.zip")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def workload(count: int, pick: Callable[[int], str], seed: int = 7) -> list[tuple[str, bytes, str]]:
    """(recipient, message, kind): 3 % EICAR, 3 % GTUBE, the rest ordinary mail."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        r = rng.random()
        kind = "eicar" if r < 0.03 else "gtube" if r < 0.06 else "ham"
        rcpt = pick(n)
        out.append((rcpt, make_message(kind, n, rcpt), kind))
    return out


def domain_picker(domain: str) -> Callable[[int], str]:
    return lambda n: f"u{n % USERS:03d}@{domain}"


# ---------------------------------------------------------------- load generator


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            return 0, "connection closed"
        lines.append(line.decode(errors="replace").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), " ".join(lines)


async def _one(port: int, rcpt: str, data: bytes, sender: str = "bench@remote.example",
               xclient: str = "") -> tuple[int, float]:
    """One session: ``xclient`` (``ADDR=192.0.2.25 LOGIN=...``) is sent after EHLO when given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO load.remote.example\r\n")
        await _reply(reader)
        if xclient:
            writer.write(f"XCLIENT {xclient}\r\n".encode())
            code, _ = await _reply(reader)
            if code != 220:
                return code, 0.0
            writer.write(b"EHLO load.remote.example\r\n")
            await _reply(reader)
        writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        await _reply(reader)
        rc, _ = await _reply(reader)
        dc, _ = await _reply(reader)
        if dc != 354:
            return rc if rc >= 400 else dc, 0.0
        payload = data.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n"
        writer.write(payload)
        await writer.drain()
        started = time.perf_counter()
        code, _ = await _reply(reader)
        latency = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        return code, latency
    finally:
        writer.close()


async def _inject(port: int, jobs: list[tuple[str, bytes, str]], sessions: int,
                  pace: float = 0.0, sender: str = "bench@remote.example",
                  xclient: str = "") -> list[tuple[int, float]]:
    """Send every job, ``sessions`` at a time; with ``pace``, message i starts no
    earlier than i / pace seconds in (arrivals spread out as spamd spreads them).
    ``sender`` and ``xclient`` as :func:`_one` takes them."""
    gate = asyncio.Semaphore(sessions)
    start = time.perf_counter()

    async def run(i: int, rcpt: str, data: bytes) -> tuple[int, float]:
        if pace:
            await asyncio.sleep(max(0.0, start + i / pace - time.perf_counter()))
        async with gate:
            try:
                return await _one(port, rcpt, data, sender, xclient)
            except OSError:
                return 0, 0.0

    return list(await asyncio.gather(*(run(i, r, d) for i, (r, d, _) in enumerate(jobs))))


# ---------------------------------------------------------------- processes


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    socket: Path
    measured: int = 0
    """The PID whose process tree's CPU is counted (0: ``proc``'s)."""
    address: str = ""
    """Where Postfix reaches the milter when it is not the unix socket ``socket``."""
    cpu: CpuMeter = field(init=False)

    def __post_init__(self) -> None:
        self.cpu = CpuMeter(self.socket.stem, self.measured or self.proc.pid)

    @property
    def milter(self) -> str:
        """The ``smtpd_milters`` entry."""
        return self.address or f"unix:{self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.cpu.close()


def wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Wait for ``proc`` to make its socket; one that does not is stopped and an error raised."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, 10)
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.05)
    path.chmod(0o666)


def start_clamav_milter(work: Path, clamd: ClamdServer) -> Daemon:
    sock = work / "clamav-milter.sock"
    conf = work / "clamav-milter.conf"
    conf.write_text(
        f"MilterSocket unix:{sock}\nMilterSocketMode 666\nFixStaleSocket yes\nForeground yes\n"
        f"ClamdSocket unix:{clamd.socket_path}\nOnInfected Reject\nOnFail Defer\nAddHeader No\n"
        f"LogFile {work}/clamav-milter.log\nLogInfected Basic\nMaxFileSize 25M\nReadTimeout 120\n"
        f"PidFile {work}/clamav-milter.pid\n"
    )
    proc = subprocess.Popen(["/usr/sbin/clamav-milter", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=(work / "clamav-milter.err").open("wb"))
    wait_socket(sock, proc, "clamav-milter")
    return Daemon("clamav-milter", proc, sock)


def start_spamass_milter(work: Path, spamd: SpamdServer) -> Daemon:
    sock = work / "spamass-milter.sock"
    proc = subprocess.Popen(
        ["/usr/sbin/spamass-milter", "-p", str(sock), "-r", "15", "-P", str(work / "spamass.pid"),
         "--", "-U", str(spamd.socket_path)],
        stdout=subprocess.DEVNULL, stderr=(work / "spamass-milter.err").open("wb"))
    wait_socket(sock, proc, "spamass-milter")
    return Daemon("spamass-milter", proc, sock)


def start_dns(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The resolver mailwarden's sender authentication asks (SPF and DMARC of every
    sender): the stack's stub DNS in a process of its own on loopback, so it takes no
    time from the load generator.  remote.example's SPF passes 127.0.0.0/8; anything
    else is NXDOMAIN.  (Without it, each lookup waits for the resolver's timeout.)"""
    zone = work / "zone"
    zone.write_text('remote.example TXT "v=spf1 ip4:127.0.0.0/8 -all"\n')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.containers", "serve-dns", "--zone", str(zone), "--listen",
         "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=(work / "dns.log").open("wb"))
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"stub DNS did not start (exit {proc.poll()})") from None
            time.sleep(0.05)


def launch_mailwarden(work: Path, slapd: SlapdServer, tag: str, milter: str, sections: str = "",
                      workers: int = 1) -> Daemon:
    """``mailwarden milter run`` with ``workers`` processes sharing its socket; ``milter``
    adds lines to the ``[milter]`` table, ``sections`` whole tables."""
    sock = work / f"{tag}.sock"
    conf = work / f"{tag}.toml"
    conf.write_text(
        f'[general]\nnode_name = "bench"\n[ldap]\nuri = "{slapd.uri}"\n{SERVICE_BIND}'
        f'[store]\nbackend = "sqlite"\nsqlite_path = "{work}/state.sqlite3"\n'
        f'[milter]\nworkers = {workers}\nsocket = "unix:{sock}"\nsocket_mode = "0666"\n'
        f'spool_dir = "{work}/spool"\n'
        f'quarantine_dir = "{work}/quarantine"\ntemplate_dir = "{work}/templates"\n{milter}{sections}'
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mailwarden.cli import main; main()", "--config", str(conf),
         "milter", "run"], stdout=subprocess.DEVNULL, stderr=(work / f"{tag}.log").open("wb"))
    wait_socket(sock, proc, "mailwarden milter")
    metered = ", metrics" if "metrics_listen" in milter else ""
    label = f"{workers} worker{'s' if workers > 1 else ''}{metered}"
    return Daemon(f"mailwarden ({label})", proc, sock)


def start_mailwarden(work: Path, slapd: SlapdServer, clamd: ClamdServer, spamd: SpamdServer,
                     reinject_port: int, archive: str, dns_port: int, workers: int = 1,
                     metrics_port: int = 0, tag: str = "", milter_extra: str = "") -> Daemon:
    """The milter as configured by default (sender authentication on, asking the stub DNS
    at 127.0.0.1:``dns_port``) with clamd and spamd, ``workers`` processes sharing its
    socket; ``archive``: the [render] lines that say where the archive mailboxes are
    (:func:`archive_settings`); /metrics on ``metrics_port`` when given."""
    tag = tag or (f"{workers}-metrics" if metrics_port else f"{workers}")
    metrics = f'metrics_listen = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    return launch_mailwarden(work, slapd, f"mailwarden-{tag}",
                             f'clamd = ["{clamd.unix_address}"]\nspamd = ["{spamd.unix_address}"]\n'
                             f'reinject = "inet:127.0.0.1:{reinject_port}"\n{metrics}{milter_extra}',
                             f'[render]\n{archive}'
                             f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\n',
                             workers=workers)


# ---------------------------------------------------------------- one variant


@dataclass
class Throughput:
    """What one variant's run reached: msg/s, end-of-data latency and the SMTP replies."""

    name: str
    messages: int
    inject_rate: float
    e2e_rate: float
    p50_ms: float
    p99_ms: float
    replies: dict[str, int]


def throughput(name: str, results: list[tuple[int, float]], injected: float, total: float) -> Throughput:
    """From (reply code, latency) per message, the seconds injection took and until the queue was empty."""
    lat = sorted(latency for code, latency in results if code == 250 or 500 <= code < 600)
    codes = Counter(f"{code // 100}xx" if code else "error" for code, _ in results)
    n = len(results)
    return Throughput(name=name, messages=n, inject_rate=n / injected, e2e_rate=n / total,
                      p50_ms=statistics.median(lat) * 1000 if lat else 0.0,
                      p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0,
                      replies=dict(codes))


@dataclass
class Result(Throughput):
    milter_cpu_ms: float
    clamd_cpu_ms: float
    spamd_cpu_ms: float
    rss_mb: float
    dovecot_cpu_ms: float = 0.0
    pace: float = 0.0


def run_variant(name: str, postfix: PostfixInstance, milters: list[Daemon], scanners: list[CpuMeter],
                jobs: list[tuple[str, bytes, str]], sessions: int, pace: float = 0.0) -> Result:
    postfix.postconf(smtpd_milters=", ".join(d.milter for d in milters))
    postfix.restart()
    # Warm up outside the measurement: imports, spamd children, and one message to every
    # recipient of the run, so the policy cache is warm (as in a running node; a cold
    # lookup is an LDAP search, measured by bench_policy.py).
    recipients = list(dict.fromkeys(rcpt for rcpt, _, _ in jobs))
    warm = [(rcpt, make_message("ham", 80_000 + i, rcpt), "ham") for i, rcpt in enumerate(recipients)]
    asyncio.run(_inject(postfix.smtpd_port, warm, min(sessions, len(warm))))
    postfix.wait_queue_empty(timeout=120)
    cpu0 = [d.cpu.seconds() for d in milters]
    scan0 = [m.seconds() for m in scanners]
    started = time.perf_counter()
    results = asyncio.run(_inject(postfix.smtpd_port, jobs, sessions, pace))
    injected = time.perf_counter() - started
    postfix.wait_queue_empty(timeout=600)
    total = time.perf_counter() - started
    cpu = sum(d.cpu.seconds() for d in milters) - sum(cpu0)
    scan = [m.seconds() - before for m, before in zip(scanners, scan0, strict=True)]
    n = len(jobs)
    return Result(
        **throughput(name, results, injected, total).__dict__,
        milter_cpu_ms=cpu / n * 1000, clamd_cpu_ms=scan[0] / n * 1000, spamd_cpu_ms=scan[1] / n * 1000,
        dovecot_cpu_ms=sum(scan[2:]) / n * 1000,
        rss_mb=max((peak_rss_mb(pid) for d in milters for pid in process_tree(d.proc.pid)), default=0.0),
        pace=pace,
    )


# ---------------------------------------------------------------- verdict check


def verdicts(postfix: PostfixInstance, sink: SmtpSink, milters: list[Daemon],
             cases: list[tuple[str, bytes, str]]) -> dict[str, str]:
    """Per case: 'refused' or 'delivered' (+ ' spam-flag' when X-Spam-Flag: YES was added)."""
    postfix.postconf(smtpd_milters=", ".join(d.milter for d in milters),
                     relayhost=sink.relayhost)
    postfix.restart()
    sink.clear()
    out: dict[str, str] = {}
    for rcpt, data, label in cases:
        code, _ = asyncio.run(_inject(postfix.smtpd_port, [(rcpt, data, label)], 1))[0]
        out[label] = "refused" if 500 <= code < 600 else "deferred" if code >= 400 else "delivered"
    postfix.wait_queue_empty(timeout=120)
    for rcpt, data, label in cases:
        if out[label] != "delivered":
            continue
        marker = data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]
        for m in sink.messages_for(rcpt):
            if marker in m.data:
                msg = email.message_from_bytes(m.data, policy=email.policy.default)
                if str(msg.get("X-Spam-Flag", "")).upper() == "YES":
                    out[label] += " spam-flag"
    return out


def archive_count(dovecot: RenderedDovecot) -> int:
    """Messages in arch.example's archive mailbox, as Dovecot counts them."""
    done = dovecot.doveadm("mailbox", "status", "-u", "archive@arch.example", "messages", "INBOX")
    return int(done.stdout.strip().removeprefix("messages=")) if done.returncode == 0 else -1


def archive_mailbox(work: Path, slapd: SlapdServer, extra: str = "", *, name: str = "mailbox",
                    render: str = "") -> tuple[RenderedDovecot, Site]:
    """The mailbox role as ``mailwarden render dovecot`` writes it (LDAP userdb, LMTP,
    Sieve, quota, NFS-safe fsync), over the bench directory in ``work/name``, with the
    ``render`` lines in its [render] section and ``extra`` appended to its dovecot.conf,
    started: it holds the archive mailboxes (accounts with the archive status, which its
    userdb finds)."""
    root = work / name
    root.mkdir()
    root.chmod(0o755)
    key = root / "archive-master.key"
    key.write_text(f"{os.urandom(12).hex()}\n")
    key.chmod(0o644)  # the milters run as nobody
    imap = free_port()
    site = Site(root, ldap_toml(slapd), extra=(f'archive_imap_port = {imap}\n'
                                               f'archive_master_password_file = "{key}"\n{render}'))
    site.ports["archive_imap"] = imap
    site.dovecot("mailbox")
    dovecot = RenderedDovecot(site, "mailbox")
    if extra:
        with dovecot.conf.open("a") as conf:
            conf.write(extra)
    dovecot.start(site.ports["lmtp"], imap)
    return dovecot, site


def archive_settings(site: Site, *, imap: bool = True) -> str:
    """The milter's [render] lines for the archive mailboxes on ``site``'s Dovecot: saved
    with IMAP MULTIAPPEND, or (``imap`` false) delivered over LMTP."""
    lines = f'default_mailbox_host = "127.0.0.1"\nmailbox_port = {site.ports["lmtp"]}\n'
    if imap:
        lines += (f'archive_imap_port = {site.ports["archive_imap"]}\n'
                  f'archive_master_password_file = "{site.root / "archive-master.key"}"\n')
    return lines


def cold_penalty(gap: float = 0.05, rounds: int = 100) -> dict[str, float]:
    """How much more the same work costs this machine right after an idle ``gap``.

    A milter paced by spamd wakes up for every step of a message from idle; one under
    load does not.  Median thread CPU time of a Python task (parsing a small message with
    the standard library) and of a C task (zlib), back to back and after sleeping.
    """
    raw = make_message("ham", 1, "u000@av.example")
    blob = raw * 6

    def python_work() -> None:  # about 60 us here, like one step of a message
        email.message_from_bytes(raw).get_payload()

    def c_work() -> None:  # about as long
        zlib.compress(blob, 6)

    def median_us(work: Callable[[], None], pause: float) -> float:
        times = []
        for _ in range(rounds):
            if pause:
                time.sleep(pause)
            t0 = time.thread_time_ns()
            work()
            times.append(time.thread_time_ns() - t0)
        return statistics.median(times) / 1000

    out = {}
    for name, work in (("python", python_work), ("c", c_work)):
        work()
        hot, cold = median_us(work, 0.0), median_us(work, gap)
        out[f"{name}_hot_us"], out[f"{name}_after_idle_us"] = round(hot, 1), round(cold, 1)
        out[f"{name}_penalty"] = round(cold / hot, 2)
    return out


def verdict_cases(domain: str, users: list[int]) -> list[tuple[str, bytes, str]]:
    cases = []
    for i, kind in enumerate(["ham", "ham", "eicar", "eicar", "gtube", "gtube"]):
        rcpt = f"u{users[i % len(users)]:03d}@{domain}"
        cases.append((rcpt, make_message(kind, 90_000 + i, rcpt), f"{kind}-{i}"))
    return cases


# ---------------------------------------------------------------- main


TWO_WORKERS = "mailwarden, virus only, workers = 2"
METRICS_ON = "mailwarden, virus only, metrics on"


def metrics_cost(runs: dict[str, list[Result]]) -> dict[str, float]:
    """What metrics on cost the virus-only path (medians of the interleaved rounds), in %."""
    def median(name: str, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs[name]))

    off, on = "mailwarden, virus only", METRICS_ON

    def pair_median(key: str) -> float:
        """The median over rounds of on / off (each round runs both, one after the other)."""
        pairs = zip(runs[off], runs[on], strict=True)
        return float(statistics.median(getattr(b, key) / getattr(a, key) for a, b in pairs))

    return {"msg_per_s_off": median(off, "e2e_rate"), "msg_per_s_on": median(on, "e2e_rate"),
            "rate_cost_pct": 100 * (1 - pair_median("e2e_rate")),
            "cpu_ms_off": median(off, "milter_cpu_ms"), "cpu_ms_on": median(on, "milter_cpu_ms"),
            "cpu_cost_pct": 100 * (pair_median("milter_cpu_ms") - 1)}


def report_metrics_pair(runs: dict[str, list[Result]]) -> int:
    cost = metrics_cost(runs)
    for name, found in runs.items():
        for r in found:
            print(f"{name:<40} {r.messages:>5} e2e {r.e2e_rate:>7.1f}/s  p50 {r.p50_ms:>6.1f} ms  "
                  f"milter {r.milter_cpu_ms:>6.2f} ms/msg  {r.replies}")
    print(f"metrics on: {cost['msg_per_s_on']:.1f} msg/s vs {cost['msg_per_s_off']:.1f} off, milter CPU "
          f"{cost['cpu_ms_on']:.2f} vs {cost['cpu_ms_off']:.2f} ms/msg (medians); cost (median of the "
          f"rounds' on/off pairs): {cost['rate_cost_pct']:+.1f} % msg/s, "
          f"{cost['cpu_cost_pct']:+.1f} % CPU per message")
    print(json.dumps({"metrics": cost, "rounds": {k: [r.__dict__ for r in v] for k, v in runs.items()}}))
    return 0


VARIANT_KEYS = {
    "postfix": "postfix alone", "clamav-milter": "clamav-milter (virus only)",
    "virus-only": "mailwarden, virus only", "metrics-on": METRICS_ON, "archived": ARCHIVED,
    "archived-lmtp": ARCHIVED_LMTP, "archived-2": ARCHIVED_2, "archived-maildir": ARCHIVED_MAILDIR,
    "workers-2": TWO_WORKERS, "peer": "peer: clamav-milter + spamass-milter",
    "mix30": "mailwarden, 30 % spam contracts", "all": ALL, "paced-clam": PACED_CLAM,
    "paced-warden": PACED_WARDEN,
}
"""``--variants`` keys and the variants they name."""


def chosen_variants(spec: str) -> set[str]:
    """The variant names ``--variants`` asks for (a paced one needs ``all``, which sets its pace)."""
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANT_KEYS]
    if unknown or not keys:
        raise SystemExit(f"--variants: unknown {', '.join(unknown) or '(none)'}; "
                         f"known: {', '.join(VARIANT_KEYS)}")
    if any(k.startswith("paced-") for k in keys) and "all" not in keys:
        raise SystemExit("--variants: a paced variant needs 'all' (its rate sets the pace)")
    return {VARIANT_KEYS[k] for k in keys}


def report_chosen(runs: dict[str, list[Result]]) -> int:
    """Each round of the chosen variants, and archived / virus-only within each round."""
    for name, found in runs.items():
        for i, r in enumerate(found, 1):
            print(f"round {i}: {name:<40} {r.messages:>5} e2e {r.e2e_rate:>7.1f}/s  p50 {r.p50_ms:>6.1f} ms  "
                  f"milter {r.milter_cpu_ms:>5.2f}  clamd {r.clamd_cpu_ms:>5.2f}  "
                  f"dovecot {r.dovecot_cpu_ms:>5.2f} ms/msg  {r.replies}")
    plain = runs.get("mailwarden, virus only")
    summary: dict[str, object] = {}
    for key, name in (("archived", ARCHIVED), ("archived_lmtp", ARCHIVED_LMTP), ("archived_2", ARCHIVED_2),
                      ("archived_maildir", ARCHIVED_MAILDIR)):
        label = name.removeprefix("mailwarden, virus only, ")
        kept = runs.get(name)
        if not (plain and kept):
            continue
        ratios = [k.e2e_rate / p.e2e_rate for p, k in zip(plain, kept, strict=True)]
        summary[f"{key}_vs_virus_only_rounds"] = [round(x, 3) for x in ratios]
        summary[f"{key}_vs_virus_only_median"] = round(statistics.median(ratios), 3)
        print(f"{label} / virus-only e2e msg/s per round: "
              + ", ".join(f"{x:.2f}x" for x in ratios)
              + f" (median {statistics.median(ratios):.2f}x; target at least 0.85x)")
    print(json.dumps({"chosen": summary, "rounds": {k: [r.__dict__ for r in v] for k, v in runs.items()}}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the messages")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all variants (the median is shown)")
    ap.add_argument("--metrics-pair", action="store_true",
                    help="only the virus-only path with metrics off and on (scraped every second)")
    ap.add_argument("--variants", default="",
                    help="only these, comma-separated: " + ", ".join(VARIANT_KEYS))
    args = ap.parse_args()
    only = chosen_variants(args.variants) if args.variants else set()
    scale = 0.2 if args.quick else 1.0
    sizes = {"fast": int(2000 * scale), "av": int(2000 * scale), "spam": int(160 * scale),
             "mix": int(400 * scale)}
    work = Path(tempfile.mkdtemp(prefix="mw-bench-milter-"))
    work.chmod(0o755)
    daemons: list[Daemon] = []
    scanners: list[CpuMeter] = []
    slapd = SlapdServer([mailwarden_database(bench_ldif(work / "bench.ldif"))]).start()
    clamd = ClamdServer().start()
    # A fixed pool of two children for everyone (no spawning in bursts).
    spamd = SpamdServer(children=2, min_children=2).start()
    sink_port = free_port()
    sink_proc = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    postfix = PostfixInstance(main_cf={
        "relay_domains": " ".join(DOMAINS), "relayhost": f"[127.0.0.1]:{sink_port}",
        "milter_protocol": "6", "milter_default_action": "tempfail", "mynetworks": "127.0.0.0/8",
        "smtpd_milters": "",
    }, syslog_name="postfix-bench")
    reinject_port = postfix.add_smtpd({"smtpd_milters": "", "receive_override_options": "no_milters",
                                       "smtpd_authorized_xforward_hosts": "127.0.0.0/8"})
    results: list[Result] = []
    checks: dict[str, object] = {}
    mailbox: RenderedDovecot | None = None
    maildir_box: RenderedDovecot | None = None
    dns_proc: subprocess.Popen[bytes] | None = None
    try:
        postfix.start()
        # Each is stopped at the end even when a later one does not start.
        dns_proc, dns_port = start_dns(work)
        mailbox, site = archive_mailbox(work, slapd)
        # The same role with the archive mailboxes in the subscribers' format.
        maildir_box, maildir_site = archive_mailbox(work, slapd, name="mailbox-maildir",
                                                    render='archive_mailbox_format = "maildir"\n')
        lmtp = archive_settings(site)
        daemons.append(clam_milter := start_clamav_milter(work, clamd))
        daemons.append(spamass := start_spamass_milter(work, spamd))
        daemons.append(warden := start_mailwarden(work, slapd, clamd, spamd, reinject_port, lmtp, dns_port))
        daemons.append(warden2 := start_mailwarden(work, slapd, clamd, spamd, reinject_port, lmtp,
                                                   dns_port, workers=2))
        metrics_port = free_port()
        daemons.append(warden_metrics := start_mailwarden(work, slapd, clamd, spamd, reinject_port, lmtp,
                                                          dns_port, metrics_port=metrics_port))
        daemons.append(warden_lmtp := start_mailwarden(work, slapd, clamd, spamd, reinject_port,
                                                       archive_settings(site, imap=False), dns_port,
                                                       tag="1-lmtp"))
        daemons.append(warden_lanes := start_mailwarden(work, slapd, clamd, spamd, reinject_port, lmtp,
                                                        dns_port, tag="1-lanes",
                                                        milter_extra="archive_imap_sessions = 2\n"))
        daemons.append(warden_maildir := start_mailwarden(work, slapd, clamd, spamd, reinject_port,
                                                          archive_settings(maildir_site), dns_port,
                                                          tag="1-maildir"))
        if clamd.pid is None or spamd.pid is None or mailbox.proc is None or maildir_box.proc is None:
            raise RuntimeError("clamd, spamd or Dovecot is not running")
        # Both Dovecots' CPU counts as the archive's: only one of them works in a variant.
        scanners += [CpuMeter("clamd", clamd.pid), CpuMeter("spamd", spamd.pid),
                     CpuMeter("dovecot", mailbox.proc.pid), CpuMeter("dovecot-maildir", maildir_box.proc.pid)]
        if not all(d.cpu.exact for d in daemons):
            print("... CPU in clock ticks (no cgroup to count in)", file=sys.stderr)
        s = args.sessions
        def plan() -> list[tuple[str, list[Daemon], list[tuple[str, bytes, str]], str]]:
            """(name, milters, jobs, variant whose rate paces the arrivals).

            Fresh messages every round: a repeat must not hit mailwarden's scan cache.
            The last two run the virus-only path at the rate spamd allows everyone-contracts-
            all: the same code and load shape with and without a spam check in it, and a C
            milter beside it, so the CPU a message costs at that pace can be told apart from
            what the spam check adds.
            """
            pair = [
                ("mailwarden, virus only", [warden], workload(sizes["av"], domain_picker("av.example")), ""),
                (METRICS_ON, [warden_metrics], workload(sizes["av"], domain_picker("av.example")), ""),
            ]
            if args.metrics_pair:
                return pair
            every = [
                ("postfix alone", [], workload(sizes["fast"], domain_picker("av.example")), ""),
                ("clamav-milter (virus only)", [clam_milter],
                 workload(sizes["av"], domain_picker("av.example")), ""),
                *pair,
                *((name, [milter], workload(sizes["av"], domain_picker("arch.example")), "")
                  for name, milter in ((ARCHIVED, warden), (ARCHIVED_LMTP, warden_lmtp),
                                       (ARCHIVED_2, warden_lanes), (ARCHIVED_MAILDIR, warden_maildir))),
                (TWO_WORKERS, [warden2], workload(sizes["av"], domain_picker("av.example")), ""),
                ("peer: clamav-milter + spamass-milter", [clam_milter, spamass],
                 workload(sizes["spam"], domain_picker("mix.example")), ""),
                ("mailwarden, 30 % spam contracts", [warden],
                 workload(sizes["mix"], domain_picker("mix.example")), ""),
                (ALL, [warden], workload(sizes["spam"], domain_picker("all.example")), ""),
                (PACED_CLAM, [clam_milter], workload(sizes["spam"], domain_picker("av.example")), ALL),
                (PACED_WARDEN, [warden], workload(sizes["spam"], domain_picker("av.example")), ALL),
            ]
            return [v for v in every if not only or v[0] in only]

        runs: dict[str, list[Result]] = {}
        # Interleaved repeats: a machine shared with other work slows every variant alike.
        for round_ in range(args.repeat):
            for name, milters, jobs, paced_by in plan():
                pace = runs[paced_by][-1].e2e_rate if paced_by else 0.0
                print(f"... round {round_ + 1}: {name}: {len(jobs)} messages", file=sys.stderr, flush=True)
                found = runs.setdefault(name, [])
                if name != METRICS_ON:
                    found.append(run_variant(name, postfix, milters, scanners, jobs, s, pace))
                    continue
                with Scraper(f"http://127.0.0.1:{metrics_port}/metrics") as scraper:
                    found.append(run_variant(name, postfix, milters, scanners, jobs, s, pace))
                if not scraper.scrapes:
                    raise RuntimeError("/metrics was never scraped")
        for found in runs.values():
            results.append(sorted(found, key=lambda r: r.e2e_rate)[len(found) // 2])
        if args.metrics_pair:
            return report_metrics_pair(runs)
        if only:
            return report_chosen(runs)
        # Every message delivered to arch.example (the warm-up's too) has its one copy.
        archived = (ARCHIVED, ARCHIVED_LMTP, ARCHIVED_2, ARCHIVED_MAILDIR)
        delivered = sum(r.replies.get("2xx", 0) + USERS for name in archived for r in runs[name])
        copies = {"kept": archive_count(mailbox) + archive_count(maildir_box), "delivered": delivered}
        with SmtpSink() as rec:
            peer = verdicts(postfix, rec, [clam_milter, spamass], verdict_cases("all.example", [1, 2]))
            ours_all = verdicts(postfix, rec, [warden], verdict_cases("all.example", [1, 2]))
            ours_mix = verdicts(postfix, rec, [warden], verdict_cases("mix.example", [1, 2]))  # contracted
            ours_mix_off = verdicts(postfix, rec, [warden], verdict_cases("mix.example", [5, 6]))
        checks = {
            "peer": peer, "mailwarden_all": ours_all, "mailwarden_mix_contracted": ours_mix,
            "mailwarden_mix_uncontracted": ours_mix_off,
            "identical_where_services_match": peer == ours_all == ours_mix,
            "archive_copies": copies,
        }
    finally:
        for d in daemons:
            d.stop()
        for box in (mailbox, maildir_box):
            if box is not None:
                box.stop()
        if dns_proc is not None:
            dns_proc.terminate()
            dns_proc.wait()
        postfix.cleanup()
        sink_proc.terminate()
        sink_proc.wait()
        spamd.cleanup()
        clamd.cleanup()
        for meter in scanners:
            meter.close()
        slapd.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    by = {r.name: r for r in results}
    header = f"{'variant':<40} {'msgs':>5} {'inject/s':>9} {'e2e/s':>7} {'p50 ms':>7} {'p99 ms':>8} " \
             f"{'milter ms/msg':>13} {'clamd ms/msg':>12} {'spamd ms/msg':>12} {'RSS MB':>7}  replies"
    print(header)
    for r in results:
        print(f"{r.name:<40} {r.messages:>5} {r.inject_rate:>9.1f} {r.e2e_rate:>7.1f} {r.p50_ms:>7.1f} "
              f"{r.p99_ms:>8.1f} {r.milter_cpu_ms:>13.2f} {r.clamd_cpu_ms:>12.2f} {r.spamd_cpu_ms:>12.1f} "
              f"{r.rss_mb:>7.1f}  {r.replies}")
    peer_rate = by["peer: clamav-milter + spamass-milter"].e2e_rate
    plain_rate = by["mailwarden, virus only"].e2e_rate
    ratios = {
        "mix30_vs_peer": by["mailwarden, 30 % spam contracts"].e2e_rate / peer_rate,
        "all_vs_peer": by[ALL].e2e_rate / peer_rate,
        "virus_only_vs_clamav_milter": by["mailwarden, virus only"].e2e_rate
        / by["clamav-milter (virus only)"].e2e_rate,
        "clamav_milter_vs_postfix": by["clamav-milter (virus only)"].e2e_rate / by["postfix alone"].e2e_rate,
        "virus_only_2_workers_vs_1": by[TWO_WORKERS].e2e_rate / by["mailwarden, virus only"].e2e_rate,
        "archived_vs_virus_only": by[ARCHIVED].e2e_rate / plain_rate,
        "archived_lmtp_vs_virus_only": by[ARCHIVED_LMTP].e2e_rate / plain_rate,
        "archived_maildir_vs_virus_only": by[ARCHIVED_MAILDIR].e2e_rate / plain_rate,
        "virus_only_metrics_on_vs_off": by[METRICS_ON].e2e_rate / by["mailwarden, virus only"].e2e_rate,
    }
    # CPU per message at the pace spamd sets, ms (a quiet node pays more per message
    # than a busy one: see docs/milter.md).
    ratios["paced_milter_cpu_mailwarden_vs_clamav_milter"] = (
        by[PACED_WARDEN].milter_cpu_ms / by[PACED_CLAM].milter_cpu_ms)
    spam_cpu = by[ALL].milter_cpu_ms - by[PACED_WARDEN].milter_cpu_ms
    idle_gap = 1 / max(by[PACED_WARDEN].pace, 1.0)
    cold = cold_penalty(idle_gap)
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"paced variants: {by[PACED_WARDEN].pace:.1f} msg/s offered (the rate of '{ALL}'); "
          f"mailwarden CPU the spam check adds at that pace: {spam_cpu:.2f} ms/msg")
    print(f"the same work right after {idle_gap * 1000:.0f} ms idle costs this machine "
          f"{cold['python_penalty']:.1f}x (Python) and {cold['c_penalty']:.1f}x (C) "
          "its CPU time back to back")
    plain, kept = by["mailwarden, virus only"], by[ARCHIVED]
    print(f"archive: {ratios['archived_vs_virus_only']:.2f}x the virus-only path's e2e msg/s "
          f"(target at least 0.85x); milter CPU {kept.milter_cpu_ms:.2f} against "
          f"{plain.milter_cpu_ms:.2f} ms/msg; the archive's Dovecot {kept.dovecot_cpu_ms:.2f} ms/msg "
          f"(over LMTP {ratios['archived_lmtp_vs_virus_only']:.2f}x, Dovecot "
          f"{by[ARCHIVED_LMTP].dovecot_cpu_ms:.2f} ms/msg; in a Maildir "
          f"{ratios['archived_maildir_vs_virus_only']:.2f}x, Dovecot "
          f"{by[ARCHIVED_MAILDIR].dovecot_cpu_ms:.2f} ms/msg); copies {checks.get('archive_copies')}")
    print(f"verdicts identical where services match: {checks.get('identical_where_services_match')}")
    for key in ("peer", "mailwarden_all", "mailwarden_mix_contracted", "mailwarden_mix_uncontracted"):
        print(f"  {key:<30} {checks.get(key)}")
    print(json.dumps({"results": [r.__dict__ for r in results], "ratios": ratios,
                      "spam_check_cpu_ms_at_pace": spam_cpu, "cold_penalty": cold, "verdicts": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
