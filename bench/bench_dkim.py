"""DKIM verification and signing through one private Postfix, side by side in one run:

* verification of inbound mail to hosted recipients: OpenDKIM (verify only), OpenDKIM
  followed by OpenDMARC (DKIM, SPF and DMARC), and mailwarden (``milter.sender_auth``:
  DKIM, SPF, DMARC and ARC, one Authentication-Results field);
* signing of mail subscribers submit with SMTP AUTH: OpenDKIM and mailwarden, each with
  the same RSA-2048 key of the signing domain.

The inbound messages come from sender.example, whose RSA-2048 key (every message) and
ed25519 key (every fifth message, a second signature), SPF record and DMARC record
(``p=reject``) are in one stub DNS zone; two thirds are a few KB of text, one third
carry a ~50 KB attachment.  They arrive from 192.0.2.25 (Postfix's XCLIENT), which the
SPF record allows; submissions are marked authenticated with XCLIENT LOGIN.  Postfix
relays everything to Postfix's own ``smtp-sink``.  mailwarden asks the stub on its
port; OpenDKIM and OpenDMARC, which take no resolver port, each run in a private
network namespace whose 127.0.0.1:53 is a stub serving the same zone
(``harness.netns``).  Nothing resolves anything outside.

OpenDKIM's concurrency is probed first: 50 parallel SMTP sessions, then 10, 5 and 1,
until a round leaves it running with every message accepted.  The peers are measured
at the concurrency they survive and at lower ones (``--lower``, 10 by default);
mailwarden at the same and at 50, and at 50 with ``milter.workers = 2``.  Reported per
variant: injection and end-to-end msg/s (until Postfix's queue is empty), end-of-data
latency p50/p99, the CPU time per message of the milter processes (OpenDKIM's and
OpenDMARC's own, without the stub beside them; each in a cgroup of its own where the
kernel offers one), peak RSS and milter crashes.  A check then sends a few messages
through each stack to a recording sink and shows what each wrote.

Needs root, postfix, slapd, opendkim, opendmarc, unshare and ip.
Usage: python -m bench.bench_dkim [--quick] [--messages 300] [--repeat 3] [--lower 10]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import dkim

from bench.bench_milter import (
    Daemon,
    Throughput,
    _inject,
    launch_mailwarden,
    minutes,
    throughput,
    wait_socket,
)
from harness import netns
from harness.cpumeter import peak_rss_mb, process_tree
from harness.dnsstub import Records, StubDns
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.process import stop_process
from harness.slapd import SlapdServer, mailwarden_database
from harness.smtpsink import SmtpSink
from milters.signing import generate_key, public_record, zone_txt

SENDER_DOMAIN = "sender.example"
"""Signs its mail (RSA, some ed25519 too); SPF and DMARC p=reject published."""
HOSTED = "isp.example"
"""The hosted recipients of inbound mail."""
SIGNING = "signing.example"
"""A hosted domain with dkim-signing: its subscribers' submissions are signed."""
CLIENT = "192.0.2.25"
"""sender.example's mail server, as Postfix's XCLIENT presents it."""
AUTHSERV = "mx.bench.example"
USERS = 50
RSA_SELECTOR, ED_SELECTOR, SIGNING_SELECTOR = "rsa2048", "ed", "bench"
SUBMITTER = f"u007@{SIGNING}"
PROBES = (50, 10, 5, 1)
INBOUND_XCLIENT = f"ADDR={CLIENT} NAME=mail.{SENDER_DOMAIN} HELO=mail.{SENDER_DOMAIN}"
SUBMIT_XCLIENT = f"LOGIN={SUBMITTER}"
TWO_WORKERS_VERIFY = "mailwarden sender_auth, 2 workers @50"
TWO_WORKERS_SIGN = "mailwarden signing, 2 workers @50"

Job = tuple[str, bytes, str]


# ---------------------------------------------------------------- keys, zone, directory


@dataclass(frozen=True)
class Keys:
    """The private keys of the run and the zone that publishes them."""

    sender_rsa: bytes
    sender_ed: bytes
    signing_rsa: bytes

    def zone(self) -> dict[str, str]:
        """The one TXT record of each name."""
        spf = "v=spf1 ip4:192.0.2.0/24 -all"
        return {
            f"{RSA_SELECTOR}._domainkey.{SENDER_DOMAIN}": public_record(self.sender_rsa, "rsa-sha256"),
            f"{ED_SELECTOR}._domainkey.{SENDER_DOMAIN}": public_record(self.sender_ed, "ed25519-sha256"),
            f"_dmarc.{SENDER_DOMAIN}": "v=DMARC1; p=reject",
            SENDER_DOMAIN: spf,
            f"{SIGNING_SELECTOR}._domainkey.{SIGNING}": public_record(self.signing_rsa, "rsa-sha256"),
            f"_dmarc.{SIGNING}": "v=DMARC1; p=reject",
            SIGNING: spf,
        }

    def records(self) -> Records:
        """The zone as :class:`StubDns` serves it."""
        return {name: {"TXT": [zone_txt(value)]} for name, value in self.zone().items()}


def make_keys() -> Keys:
    return Keys(generate_key("rsa")[0], generate_key("ed25519")[0], generate_key("rsa")[0])


def bench_ldif(path: Path) -> Path:
    """The hosted domain (no services) and the signing domain, USERS subscribers each."""
    base = "ou=domains,dc=mailwarden,dc=test"
    out: list[str] = []
    for domain, extra in ((HOSTED, []), (SIGNING, ["mwEnabledService: dkim-signing",
                                                    f"mwDkimSelector: {SIGNING_SELECTOR}"])):
        ddn = f"mwDomainName={domain},{base}"
        out += [f"dn: {ddn}", "objectClass: mwDomain", f"mwDomainName: {domain}", *extra, ""]
        out += [f"dn: ou=users,{ddn}", "objectClass: organizationalUnit", "ou: users", ""]
        for i in range(USERS):
            out += [f"dn: uid=u{i:03d},ou=users,{ddn}", "objectClass: inetOrgPerson",
                    "objectClass: mwSubscriber", f"uid: u{i:03d}", f"cn: User {i}", "sn: User",
                    f"mail: u{i:03d}@{domain}", ""]
    path.write_text("\n".join(out) + "\n")
    return path


# ---------------------------------------------------------------- messages


def compose(n: int, sender: str, rcpt: str, rng: random.Random) -> bytes:
    """A few KB of text; every third message also a ~50 KB attachment."""
    msg = minutes(n, sender, rcpt, rng=rng)
    if n % 3 == 2:
        msg.add_attachment(rng.randbytes(37_000), maintype="application", subtype="pdf",
                           filename=f"report-{n}.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def inbound(count: int, keys: Keys, seed: int = 7) -> list[Job]:
    """Mail from sender.example to hosted recipients, RSA-signed (every fifth also ed25519)."""
    rng = random.Random(seed)
    jobs = []
    for n in range(count):
        rcpt = f"u{n % USERS:03d}@{HOSTED}"
        data = compose(n, f"news@{SENDER_DOMAIN}", rcpt, rng)
        signatures = [(RSA_SELECTOR, keys.sender_rsa, b"rsa-sha256")]
        if n % 5 == 4:
            signatures.append((ED_SELECTOR, keys.sender_ed.strip(), b"ed25519-sha256"))
        head = b""
        for selector, key, algorithm in signatures:
            head += dkim.sign(data, selector.encode(), SENDER_DOMAIN.encode(), key,
                              canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=algorithm)
        jobs.append((rcpt, head + data, "ed25519+rsa" if len(signatures) > 1 else "rsa"))
    return jobs


def submissions(count: int, seed: int = 11) -> list[Job]:
    """Unsigned mail of a signing.example subscriber to remote recipients."""
    rng = random.Random(seed)
    return [(f"friend{n}@remote.example", compose(n, SUBMITTER, f"friend{n}@remote.example", rng), "submit")
            for n in range(count)]


# ---------------------------------------------------------------- peers


@dataclass
class Peer:
    """OpenDKIM or OpenDMARC in its own namespace, restarted when it has died."""

    name: str
    argv: list[str]
    """The command line, with the configuration file and the foreground flag."""
    records: Records
    work: Path
    daemon: Daemon | None = None
    crashes: list[int] = field(default_factory=list)
    """Exit statuses of the deaths seen (128 + N: signal N)."""

    @property
    def socket(self) -> Path:
        return self.work / f"{self.name}.sock"

    def start(self) -> Daemon:
        self.socket.unlink(missing_ok=True)
        log = (self.work / f"{self.name}.log").open("ab")
        keeper = netns.spawn_with_stub_dns(self.records, self.argv, log)
        wait_socket(self.socket, keeper, self.name)
        try:
            pid = netns.daemon_pid(keeper, self.argv[0])
        except RuntimeError:
            stop_process(keeper, 10)
            raise
        self.daemon = Daemon(self.name, keeper, self.socket, measured=pid)
        return self.daemon

    def alive(self) -> Daemon:
        """The running daemon; a death since the last look is recorded and it is restarted."""
        if self.daemon is not None and self.daemon.proc.poll() is None:
            return self.daemon
        if self.daemon is not None:
            self.crashes.append(self.daemon.proc.returncode)
            self.daemon.stop()
        return self.start()

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


def opendkim_conf(work: Path, keys: Keys) -> Path:
    """Sign for signing.example what internal hosts send (submissions come from 127.0.0.1),
    verify the rest."""
    key = work / "opendkim-keys" / f"{SIGNING}.{SIGNING_SELECTOR}.key"
    key.parent.mkdir(mode=0o700)
    key.write_bytes(keys.signing_rsa)
    key.chmod(0o600)
    (work / "opendkim.keytable").write_text(f"{SIGNING_SELECTOR} {SIGNING}:{SIGNING_SELECTOR}:{key}\n")
    (work / "opendkim.signingtable").write_text(f"{SIGNING} {SIGNING_SELECTOR}\n")
    conf = work / "opendkim.conf"
    conf.write_text(
        f"Socket local:{work}/opendkim.sock\nUMask 000\nMode sv\nSyslog no\n"
        f"AuthservID {AUTHSERV}\nNameservers 127.0.0.1\nCanonicalization relaxed/relaxed\n"
        f"KeyTable file:{work}/opendkim.keytable\nSigningTable file:{work}/opendkim.signingtable\n"
        "InternalHosts 127.0.0.1\nOversignHeaders From\nOn-NoSignature accept\nRequireSafeKeys false\n"
        f"PidFile {work}/opendkim.pid\n"
    )
    return conf


def opendmarc_conf(work: Path) -> Path:
    """Trust OpenDKIM's results (same authserv-id), check SPF itself, reject DMARC failures."""
    conf = work / "opendmarc.conf"
    conf.write_text(
        f"Socket local:{work}/opendmarc.sock\nUMask 000\nSyslog false\nAuthservID {AUTHSERV}\n"
        f"TrustedAuthservIDs {AUTHSERV}\nSPFSelfValidate true\nSPFIgnoreResults true\n"
        f"RejectFailures true\nIgnoreAuthenticatedClients true\nPidFile {work}/opendmarc.pid\n"
    )
    return conf


# ---------------------------------------------------------------- one variant


@dataclass
class Result(Throughput):
    work: str
    """``verify`` or ``sign``."""
    sessions: int
    milter_cpu_ms: float
    cpu_ms: dict[str, float]
    """Per milter."""
    rss_mb: float
    crashes: int
    """Milters that were found dead after the run."""


def run_variant(name: str, work: str, postfix: PostfixInstance, milters: list[Daemon], jobs: list[Job],
                sessions: int, sender: str, xclient: str, warm: list[Job]) -> Result:
    """Send ``jobs`` through Postfix with ``milters`` after the ``warm`` messages (caches)."""
    postfix.postconf(smtpd_milters=", ".join(f"unix:{d.socket}" for d in milters))
    postfix.restart()
    asyncio.run(_inject(postfix.smtpd_port, warm, min(sessions, len(warm)), sender=sender, xclient=xclient))
    postfix.wait_queue_empty(timeout=120)
    cpu0 = [d.cpu.seconds() for d in milters]
    started = time.perf_counter()
    results = asyncio.run(_inject(postfix.smtpd_port, jobs, sessions, sender=sender, xclient=xclient))
    injected = time.perf_counter() - started
    postfix.wait_queue_empty(timeout=600)
    total = time.perf_counter() - started
    n = len(jobs)
    cpu = {d.name: (d.cpu.seconds() - before) / n * 1000 for d, before in zip(milters, cpu0, strict=True)}
    return Result(
        **throughput(name, results, injected, total).__dict__, work=work, sessions=sessions,
        milter_cpu_ms=sum(cpu.values()), cpu_ms=cpu,
        rss_mb=max((peak_rss_mb(pid) for d in milters if d.proc.poll() is None
                    for pid in process_tree(d.measured or d.proc.pid)), default=0.0),
        crashes=sum(1 for d in milters if d.proc.poll() is not None),
    )


# ---------------------------------------------------------------- what each wrote


def written(postfix: PostfixInstance, sink: SmtpSink, milters: list[Daemon], jobs: list[Job], sender: str,
            xclient: str, keys: Keys) -> list[str]:
    """Per message: the Authentication-Results fields added, or whether the signature verifies."""
    postfix.postconf(smtpd_milters=", ".join(f"unix:{d.socket}" for d in milters), relayhost=sink.relayhost)
    postfix.restart()
    sink.clear()
    replies = asyncio.run(_inject(postfix.smtpd_port, jobs, 1, sender=sender, xclient=xclient))
    postfix.wait_queue_empty(timeout=60)
    zone = {f"{name}.".encode(): value.encode() for name, value in keys.zone().items()}

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return zone.get(name, b"")

    out = []
    for (rcpt, _, _), (code, _) in zip(jobs, replies, strict=True):
        got = sink.messages_for(rcpt)
        if code != 250 or not got:
            out.append(f"reply {code}")
        elif xclient.startswith("LOGIN="):
            d = dkim.DKIM(got[-1].data)
            out.append(f"signed, verifies: {d.verify(dnsfunc=dns)}")
        else:
            out.append(" | ".join(" ".join(v.split()) for v in got[-1].headers("Authentication-Results")))
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the messages")
    ap.add_argument("--messages", type=int, default=300, help="messages per measured run")
    ap.add_argument("--lower", type=lambda v: [int(n) for n in v.split(",") if n], default=[10],
                    help="lower session counts everyone is also measured at (comma-separated)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds of all variants (the median "
                    "is shown)")
    args = ap.parse_args()
    if not netns.available():
        print("needs root, unshare and ip (the peers run in a private network namespace)", file=sys.stderr)
        return 2
    count = max(20, args.messages // 5 if args.quick else args.messages)
    work = Path(tempfile.mkdtemp(prefix="mw-bench-dkim-"))
    work.chmod(0o755)
    keys = make_keys()
    records = keys.records()
    stub = StubDns(records).start()
    (work / "keys").mkdir()
    (work / "keys" / f"{SIGNING}.{SIGNING_SELECTOR}.key").write_bytes(keys.signing_rsa)
    slapd = SlapdServer([mailwarden_database(bench_ldif(work / "bench.ldif"))]).start()
    sink_port = free_port()
    sink_proc = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    postfix = PostfixInstance(main_cf={
        "relay_domains": HOSTED, "relayhost": f"[127.0.0.1]:{sink_port}", "myhostname": AUTHSERV,
        "milter_protocol": "6", "milter_default_action": "tempfail", "mynetworks": "127.0.0.0/8",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_milters": "",
        # One sending server for every inbound session: no per-client connection limit.
        "smtpd_client_event_limit_exceptions": f"127.0.0.0/8 {CLIENT}",
        "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
    }, syslog_name="postfix-bench")
    opendkim = Peer("opendkim", ["opendkim", "-f", "-x", str(opendkim_conf(work, keys))], records, work)
    opendmarc = Peer("opendmarc", ["opendmarc", "-f", "-c", str(opendmarc_conf(work))], records, work)
    wardens: list[Daemon] = []
    results: list[Result] = []
    probes: list[dict[str, object]] = []
    checks: dict[str, list[str]] = {}
    try:
        postfix.start()
        for workers in (1, 2):
            wardens.append(launch_mailwarden(
                work, slapd, f"mailwarden-{workers}",
                f'sender_auth = true\nauthserv_id = "{AUTHSERV}"\n'
                f'dkim_key_path = "{work}/keys/{{domain}}.{{selector}}.key"\n',
                f'[dns]\nnameservers = ["127.0.0.1"]\nport = {stub.port}\n', workers=workers))
        warden, warden2 = wardens
        opendkim.start()
        opendmarc.start()
        warm_in = inbound(USERS, keys, seed=3)
        warm_out = submissions(5, seed=5)

        # How many sessions OpenDKIM survives, verifying and signing.
        survived = 0
        for sessions in PROBES:
            ok = True
            for work_name, jobs, sender, xclient, warm in (
                    ("verify", inbound(min(count, 200), keys, seed=17), f"news@{SENDER_DOMAIN}",
                     INBOUND_XCLIENT, warm_in),
                    ("sign", submissions(min(count, 200), seed=19), SUBMITTER, SUBMIT_XCLIENT, warm_out)):
                print(f"... probe: OpenDKIM {work_name} at {sessions} sessions", file=sys.stderr, flush=True)
                r = run_variant("probe", work_name, postfix, [opendkim.alive()], jobs, sessions, sender,
                                xclient, warm)
                probes.append({"work": work_name, "sessions": sessions, "crashed": bool(r.crashes),
                               "replies": r.replies})
                ok = ok and not r.crashes and r.replies == {"2xx": len(jobs)}
            if ok:
                survived = sessions
                break
        if not survived:
            raise RuntimeError(f"OpenDKIM survived no concurrency: {probes}")
        peer_c = survived

        levels = [peer_c, *(n for n in args.lower if n < peer_c)]

        def plan() -> list[tuple[str, str, list[Peer | Daemon], int]]:
            """(variant, work, milters, sessions): the peers at ``levels``, mailwarden there and at 50."""
            out: list[tuple[str, str, list[Peer | Daemon], int]] = [
                (f"postfix alone @{peer_c}", "verify", [], peer_c)]
            for n in levels:
                out += [(f"OpenDKIM verify @{n}", "verify", [opendkim], n),
                        (f"OpenDKIM + OpenDMARC @{n}", "verify", [opendkim, opendmarc], n),
                        (f"mailwarden sender_auth @{n}", "verify", [warden], n)]
            out += [("mailwarden sender_auth @50", "verify", [warden], 50),
                    (TWO_WORKERS_VERIFY, "verify", [warden2], 50)]
            for n in levels:
                out += [(f"OpenDKIM sign @{n}", "sign", [opendkim], n),
                        (f"mailwarden signing @{n}", "sign", [warden], n)]
            out += [("mailwarden signing @50", "sign", [warden], 50),
                    (TWO_WORKERS_SIGN, "sign", [warden2], 50)]
            return out

        runs: dict[str, list[Result]] = {}
        for round_ in range(args.repeat):
            seen: set[str] = set()
            for name, work_name, stack, sessions in plan():
                if name in seen:  # mailwarden at 50 when the peers ran at 50 too
                    continue
                seen.add(name)
                # A peer that died is restarted (its death recorded) before each variant.
                milters = [m.alive() if isinstance(m, Peer) else m for m in stack]
                verify = work_name == "verify"
                jobs = inbound(count, keys, seed=100 + round_) if verify else submissions(count, 200 + round_)
                print(f"... round {round_ + 1}: {name}: {len(jobs)} messages", file=sys.stderr, flush=True)
                runs.setdefault(name, []).append(run_variant(
                    name, work_name, postfix, milters, jobs, sessions,
                    f"news@{SENDER_DOMAIN}" if verify else SUBMITTER,
                    INBOUND_XCLIENT if verify else SUBMIT_XCLIENT, warm_in if verify else warm_out))
        for found in runs.values():
            results.append(sorted(found, key=lambda r: r.e2e_rate)[len(found) // 2])

        with SmtpSink() as rec:
            sample_in = inbound(5, keys, seed=23)[3:5]  # one RSA-signed, one RSA + ed25519
            sample_out = submissions(1, seed=29)
            for label, milters in (("opendkim", [opendkim.alive()]),
                                   ("opendkim+opendmarc", [opendkim.alive(), opendmarc.alive()]),
                                   ("mailwarden", [warden])):
                checks[f"{label} verify"] = written(postfix, rec, milters, sample_in, f"news@{SENDER_DOMAIN}",
                                                    INBOUND_XCLIENT, keys)
            for label, milters in (("opendkim", [opendkim.alive()]), ("mailwarden", [warden])):
                checks[f"{label} sign"] = written(postfix, rec, milters, sample_out, SUBMITTER,
                                                  SUBMIT_XCLIENT, keys)
    finally:
        running: list[Peer | Daemon] = [opendkim, opendmarc, *wardens]
        for daemon in running:
            daemon.stop()
        postfix.cleanup()
        sink_proc.terminate()
        sink_proc.wait()
        slapd.cleanup()
        stub.stop()
        if not os.environ.get("MW_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)

    by = {r.name: r for r in results}
    print("OpenDKIM concurrency probes: " + ", ".join(
        f"{p['work']}@{p['sessions']}: {'CRASHED' if p['crashed'] else 'ok'} {p['replies']}" for p in probes))
    print(f"peers measured at {peer_c} sessions; OpenDKIM deaths: {len(opendkim.crashes)} "
          f"{opendkim.crashes}, OpenDMARC deaths: {len(opendmarc.crashes)} {opendmarc.crashes}")
    header = (f"{'variant':<38} {'work':<6} {'sess':>4} {'msgs':>5} {'inject/s':>9} {'e2e/s':>7} "
              f"{'p50 ms':>7} {'p99 ms':>8} {'milter CPU ms/msg':>17} {'RSS MB':>7} {'crash':>5}  replies")
    print(header)
    for r in results:
        print(f"{r.name:<38} {r.work:<6} {r.sessions:>4} {r.messages:>5} {r.inject_rate:>9.1f} "
              f"{r.e2e_rate:>7.1f} {r.p50_ms:>7.1f} {r.p99_ms:>8.1f} {r.milter_cpu_ms:>17.2f} "
              f"{r.rss_mb:>7.1f} {r.crashes:>5}  {r.replies}")
    # Throughput ratios are taken within each round (the machine's load moves between
    # rounds) and the median of the rounds' ratios is reported; CPU ratios come from the
    # median rounds above.
    per_round: dict[str, list[float]] = {}

    def rate_ratio(key: str, ours: str, theirs: str) -> None:
        pairs = zip(runs[ours], runs[theirs], strict=True)
        per_round[key] = [round(a.e2e_rate / b.e2e_rate, 2) for a, b in pairs]

    ratios: dict[str, float] = {}
    for n in levels:
        ours_v, ours_s = f"mailwarden sender_auth @{n}", f"mailwarden signing @{n}"
        rate_ratio(f"verify_dmarc_vs_opendkim_verify@{n}", ours_v, f"OpenDKIM verify @{n}")
        rate_ratio(f"verify_dmarc_vs_opendkim_opendmarc@{n}", ours_v, f"OpenDKIM + OpenDMARC @{n}")
        rate_ratio(f"sign_vs_opendkim_sign@{n}", ours_s, f"OpenDKIM sign @{n}")
        ratios |= {
            f"verify_cpu_vs_opendkim_opendmarc@{n}": by[ours_v].milter_cpu_ms
            / by[f"OpenDKIM + OpenDMARC @{n}"].milter_cpu_ms,
            f"sign_cpu_vs_opendkim@{n}": by[ours_s].milter_cpu_ms / by[f"OpenDKIM sign @{n}"].milter_cpu_ms,
        }
    rate_ratio("verify_dmarc_2_workers_vs_opendkim_verify@50", TWO_WORKERS_VERIFY, "OpenDKIM verify @50")
    rate_ratio("sign_2_workers_vs_opendkim_sign@50", TWO_WORKERS_SIGN, "OpenDKIM sign @50")
    rate_ratio("verify_2_workers_vs_1@50", TWO_WORKERS_VERIFY, "mailwarden sender_auth @50")
    rate_ratio("sign_2_workers_vs_1@50", TWO_WORKERS_SIGN, "mailwarden signing @50")
    ratios |= {key: statistics.median(values) for key, values in per_round.items()}
    print("ratios (end-to-end msg/s: median of the rounds' ratios; CPU: of the median rounds):")
    for key, value in ratios.items():
        print(f"  {key:<48} {value:.2f}x" + (f"  rounds {per_round[key]}" if key in per_round else ""))
    print(f"questions mailwarden asked the stub DNS in the whole run: {len(stub.queries)} (answers cached)")
    for label, lines in checks.items():
        for line in lines:
            print(f"  {label:<28} {line}")
    print(json.dumps({"peer_sessions": peer_c, "probes": probes, "results": [r.__dict__ for r in results],
                      "ratios": ratios, "per_round": per_round, "opendkim_deaths": opendkim.crashes,
                      "opendmarc_deaths": opendmarc.crashes, "mailwarden_dns_queries": len(stub.queries),
                      "written": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
