"""Where the archive's Dovecot spends its CPU per LMTP delivery, by configuration variant.

The mailbox role as ``mailwarden render dovecot`` writes it (LDAP userdb with its auth
cache, Sieve, quota, ``mail_fsync = always`` and the other NFS settings; the archive
account as an sdbox with ``count`` quota and ``mail_fsync = optimized`` from its userdb)
is started over the bench_milter directory; each variant sets [render] lines or appends
settings to its dovecot.conf (a later setting overrides an earlier one; the userdb's
fields override both).  Per variant, a Dovecot of its own receives ``--prefill`` copies
first (an archive is never read, so it only grows), then ``--count`` copies of a 2.3 KB
message to ``archive@arch.example``: over one kept-open LMTP session, and over 4
sessions in parallel.  Reported: CPU ms per delivery of all Dovecot processes (a cgroup
of their own), split by process name (lmtp, auth, log, ...: clock ticks of /proc, so
rounded), and deliveries per second.

Needs root, dovecot (core, lmtpd, ldap, sieve), slapd.
Usage: python -m bench.bench_archive_dovecot [--variants rendered,maildir] [--prefill 1000]
       [--count 500] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_milter import archive_mailbox, bench_ldif, make_message
from harness.cpumeter import CpuMeter, seconds_by_name
from harness.slapd import SlapdServer, mailwarden_database

ARCHIVE = "archive@arch.example"
MAILDIR = 'archive_mailbox_format = "maildir"\n'
VARIANTS = {
    "rendered": ("", ""),
    "maildir": (MAILDIR, ""),
    "maildir-no-sieve": (MAILDIR, "protocol lmtp {\n  mail_plugins = $mail_plugins\n}\n"),
    "maildir-lmtp-kept-processes": (MAILDIR, "service lmtp {\n  process_min_avail = 2\n}\n"),
    "maildir-no-rcpt-quota-check": (MAILDIR, "lmtp_rcpt_check_quota = no\n"),
}
"""[render] lines and settings appended to the rendered dovecot.conf, by variant."""


def deliver(port: int, count: int, data: bytes, sessions: int) -> float:
    """``count`` copies over ``sessions`` parallel kept-open sessions; seconds taken."""
    done: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with smtplib.LMTP("127.0.0.1", port) as lmtp:
                lmtp.ehlo()
                for _ in range(count // sessions):
                    lmtp.sendmail("bench@remote.example", [ARCHIVE], data)
                    done.append(1)
        except (smtplib.SMTPException, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(sessions)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors or len(done) != count // sessions * sessions:
        raise RuntimeError(f"{len(done)} delivered; {errors[:1]}")
    return time.perf_counter() - started


def measure(work: Path, slapd: SlapdServer, name: str, prefill: int, count: int) -> dict[str, object]:
    data = make_message("ham", 1, ARCHIVE)
    render, extra = VARIANTS[name]
    dovecot, site = archive_mailbox(work, slapd, extra, render=render)
    assert dovecot.proc is not None
    try:
        port = site.ports["lmtp"]
        deliver(port, 20, data, 1)  # the lmtp process, auth cache and mailbox exist
        if prefill:
            deliver(port, prefill, data, 4)
        result: dict[str, object] = {"variant": name}
        with CpuMeter(f"archive-dovecot-{name}", dovecot.proc.pid) as meter:
            for sessions in (1, 4):
                cpu0, ticks0 = meter.seconds(), seconds_by_name(dovecot.proc.pid)
                took = deliver(port, count, data, sessions)
                cpu = meter.seconds() - cpu0
                ticks = seconds_by_name(dovecot.proc.pid)
                result[f"s{sessions}"] = {
                    "cpu_ms": round(cpu / count * 1000, 3), "per_s": round(count / took, 1),
                    "by_process_ms": {k: round((v - ticks0.get(k, 0)) * 1000 / count, 2)
                                      for k, v in ticks.items() if v - ticks0.get(k, 0)},
                }
        return result
    finally:
        dovecot.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--prefill", type=int, default=1000, help="copies in the archive before measuring")
    ap.add_argument("--count", type=int, default=500, help="copies measured per session count")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds (the median is shown)")
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="mw-bench-archive-"))
    work.chmod(0o755)
    slapd = SlapdServer([mailwarden_database(bench_ldif(work / "bench.ldif"))]).start()
    rounds: dict[str, list[dict[str, object]]] = {n: [] for n in names}
    try:
        for round_ in range(args.repeat):
            for index, name in enumerate(names):
                print(f"... round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                here = work / f"{index}-{round_}"  # short: Dovecot's socket paths must fit
                here.mkdir()
                here.chmod(0o755)
                rounds[name].append(measure(here, slapd, name, args.prefill, args.count))
                shutil.rmtree(here, ignore_errors=True)
    finally:
        slapd.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    def median(name: str, sessions: int, key: str) -> float:
        return float(statistics.median(r[f"s{sessions}"][key] for r in rounds[name]))  # type: ignore[index]

    print(f"{'variant':<28} {'1 session ms':>12} {'/s':>6} {'4 sessions ms':>13} {'/s':>6}  "
          "by process (4 sessions, last round)")
    for name in names:
        last = rounds[name][-1]["s4"]["by_process_ms"]  # type: ignore[index]
        print(f"{name:<28} {median(name, 1, 'cpu_ms'):>12.2f} {median(name, 1, 'per_s'):>6.0f} "
              f"{median(name, 4, 'cpu_ms'):>13.2f} {median(name, 4, 'per_s'):>6.0f}  {last}")
    print(json.dumps({"prefill": args.prefill, "count": args.count, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
