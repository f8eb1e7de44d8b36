"""rspamd as the spam engine, side by side in one run through one private Postfix:

* the peer stack clamav-milter + spamass-milter (spamd: 2 children, network tests off);
* rspamd alone as the milter: its proxy worker in milter mode scanning itself
  (``self_scan``, 2 processes) on a unix socket, clamd through rspamd's antivirus
  module;
* mailwarden (one worker) with ``spam_engine = "rspamd"``: clamd through mailwarden's
  own client, rspamd's normal worker (2 processes) over ``/checkv2`` on a unix socket
  (all connections are unix sockets, Postfix's to the milters included); with its sender
  authentication off, as rspamd alone does no SPF or DMARC here (the load comes from
  127.0.0.1, which rspamd does not check), and once more with it on (the default:
  SPF, DKIM, DMARC and ARC of every message against the run's stub DNS, and rspamd's
  own switched off for its requests, ``rspamd_skip_auth``).

Everyone contracts virus and spam checking (quiet.example of bench/bench_milter.py's
directory, which sends no virus notices: rspamd alone and the peer stack notify no one,
and each notice would be one more message through Postfix); the same messages for
everyone (a few KB of meeting minutes, each body unique, 3 % with EICAR in a zip, 3 %
GTUBE), one message per SMTP session, ``--sessions``
in parallel, after one warm-up message per recipient. One rspamd serves every rspamd
variant (Debian's rules, the modules that only ask the internet off, no Redis, its
resolver the stub DNS of the run).

Reported per variant: end-to-end msg/s, end-of-data latency, CPU per message of the
milter, clamd and the spam engine (for rspamd alone the milter is the engine: the
two columns are the same process tree), and the ratios the targets are about:
mailwarden + rspamd against the peer stack (at least 5x) and against rspamd alone
(at least 0.8x), each also per round (the rounds' ratios, as the machine's load moves
between rounds). A verdict check sends the same small set (ham, EICAR, GTUBE) through
each to a recording sink.

Needs root, postfix, clamav-daemon, spamd, clamav-milter, spamass-milter, rspamd.
Usage: python -m bench.bench_rspamd [--quick] [--sessions 20] [--repeat N]
Prints a table, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_milter import (
    Daemon,
    Result,
    bench_ldif,
    domain_picker,
    launch_mailwarden,
    run_variant,
    start_clamav_milter,
    start_dns,
    start_spamass_milter,
    verdict_cases,
    verdicts,
    workload,
)
from harness.clamd import ClamdServer
from harness.cpumeter import CpuMeter
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.rspamd import RspamdServer
from harness.slapd import SlapdServer, mailwarden_database
from harness.smtpsink import SmtpSink
from harness.spamd import SpamdServer

PEER = "peer: clamav-milter + spamass-milter"
ALONE = "rspamd alone (proxy milter, self-scan)"
OURS = "mailwarden + rspamd"
OURS_AUTH = "mailwarden + rspamd, sender auth on"
DOMAIN = "quiet.example"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the messages")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds (the median is shown)")
    ap.add_argument("--messages", type=int, default=0, help="messages per variant (default 1000, quick 200)")
    args = ap.parse_args()
    count = args.messages or (200 if args.quick else 1000)
    peer_count = max(60, count // 5)  # spamd's pace: fewer messages, the same rate
    work = Path(tempfile.mkdtemp(prefix="mw-bench-rspamd-"))
    work.chmod(0o755)
    daemons: list[Daemon] = []
    meters: list[CpuMeter] = []
    slapd = SlapdServer([mailwarden_database(bench_ldif(work / "bench.ldif"))]).start()
    clamd = ClamdServer().start()
    spamd = SpamdServer(children=2, min_children=2).start()
    rspamd: RspamdServer | None = None
    dns_proc: subprocess.Popen[bytes] | None = None
    sink_port = free_port()
    sink_proc = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    postfix = PostfixInstance(main_cf={
        "relay_domains": DOMAIN, "relayhost": f"[127.0.0.1]:{sink_port}",
        "milter_protocol": "6", "milter_default_action": "tempfail", "mynetworks": "127.0.0.0/8",
        "smtpd_milters": "",
    }, syslog_name="postfix-bench")
    reinject_port = postfix.add_smtpd({"smtpd_milters": "", "receive_override_options": "no_milters",
                                       "smtpd_authorized_xforward_hosts": "127.0.0.0/8"})
    runs: dict[str, list[Result]] = {}
    checks: dict[str, dict[str, str]] = {}
    try:
        postfix.start()
        dns_proc, dns_port = start_dns(work)
        # rspamd runs as _rspamd: clamd's unix socket (and its directory) must let it in.
        clamd.dir.chmod(0o755)
        clamd.socket_path.chmod(0o666)
        rspamd = RspamdServer(dns_port, workers=2, proxy=True, proxy_workers=2,
                              clamd=str(clamd.socket_path)).start()
        daemons.append(clam_milter := start_clamav_milter(work, clamd))
        daemons.append(spamass := start_spamass_milter(work, spamd))
        keys = (f'clamd = ["{clamd.unix_address}"]\nspam_engine = "rspamd"\n'
                f'rspamd = ["{rspamd.unix_address}"]\n'
                f'reinject = "inet:127.0.0.1:{reinject_port}"\n')
        dns_section = f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\n'
        daemons.append(warden := launch_mailwarden(work, slapd, "mailwarden-rspamd",
                                                   keys + "sender_auth = false\n", dns_section))
        daemons.append(warden_auth := launch_mailwarden(work, slapd, "mailwarden-rspamd-auth", keys,
                                                        dns_section))
        if clamd.pid is None or spamd.pid is None or rspamd.proc is None:
            raise RuntimeError("clamd, spamd or rspamd is not running")
        # rspamd alone: the milter is rspamd's own tree, counted by the engine's meter
        # (a process is in one cgroup only).
        alone = Daemon("rspamd", rspamd.proc, work / "rspamd-proxy", address=rspamd.milter_unix_address)
        alone.cpu.close()
        clamd_meter, spamd_meter, rspamd_meter = (CpuMeter("clamd", clamd.pid), CpuMeter("spamd", spamd.pid),
                                                  CpuMeter("rspamd", rspamd.proc.pid))
        alone.cpu = rspamd_meter
        meters += [clamd_meter, spamd_meter]
        if not all(m.exact for m in (clamd_meter, spamd_meter, rspamd_meter)):
            print("... CPU in clock ticks (no cgroup to count in)", file=sys.stderr)
        pick = domain_picker(DOMAIN)
        plan = [
            (PEER, [clam_milter, spamass], [clamd_meter, spamd_meter], peer_count),
            (ALONE, [alone], [clamd_meter, rspamd_meter], count),
            (OURS, [warden], [clamd_meter, rspamd_meter], count),
            (OURS_AUTH, [warden_auth], [clamd_meter, rspamd_meter], count),
        ]
        for round_ in range(args.repeat):
            for name, milters, scanners, n in plan:
                # The same kinds in the same order for everyone (the peer stack the first n);
                # every body is new (a random reference): no scan-cache hits anywhere.
                jobs = workload(n, pick, seed=7 + round_)
                print(f"... round {round_ + 1}: {name}: {n} messages", file=sys.stderr, flush=True)
                runs.setdefault(name, []).append(run_variant(name, postfix, milters, scanners, jobs,
                                                             args.sessions))
        with SmtpSink() as rec:
            for name, milters, _, _ in plan:
                checks[name] = verdicts(postfix, rec, milters, verdict_cases(DOMAIN, [1, 2]))
    finally:
        for d in daemons:
            d.stop()
        if dns_proc is not None:
            dns_proc.terminate()
            dns_proc.wait()
        postfix.cleanup()
        sink_proc.terminate()
        sink_proc.wait()
        for meter in meters:
            meter.close()
        if rspamd is not None:
            rspamd.cleanup()
        spamd.cleanup()
        clamd.cleanup()
        slapd.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    results = {name: sorted(found, key=lambda r: r.e2e_rate)[len(found) // 2] for name, found in runs.items()}
    print(f"{'variant':<40} {'msgs':>5} {'e2e/s':>7} {'p50 ms':>7} {'p99 ms':>8} {'milter ms/msg':>13} "
          f"{'clamd ms/msg':>12} {'engine ms/msg':>13}  replies")
    for r in results.values():
        print(f"{r.name:<40} {r.messages:>5} {r.e2e_rate:>7.1f} {r.p50_ms:>7.1f} {r.p99_ms:>8.1f} "
              f"{r.milter_cpu_ms:>13.2f} {r.clamd_cpu_ms:>12.2f} {r.spamd_cpu_ms:>13.2f}  {r.replies}")
    # Each round runs every variant one after the other: a ratio within a round compares
    # like with like on a machine whose load moves; the headline is their median.
    pairs = {f"{ours}_vs_{other}": (name, against)
             for ours, name in (("mailwarden_rspamd", OURS), ("sender_auth_on", OURS_AUTH))
             for other, against in (("peer", PEER), ("rspamd_alone", ALONE))}
    per_round = {key: [round(a.e2e_rate / b.e2e_rate, 2)
                       for a, b in zip(runs[name], runs[against], strict=True)]
                 for key, (name, against) in pairs.items()}
    ratios = {key: float(statistics.median(values)) for key, values in per_round.items()}
    cpu = {name: r.milter_cpu_ms + r.clamd_cpu_ms + (r.spamd_cpu_ms if name != ALONE else 0.0)
           for name, r in results.items()}
    print("ratios (median of the rounds' ratios): mailwarden + rspamd "
          f"{ratios['mailwarden_rspamd_vs_peer']:.2f}x the peer stack (target >= 5x), "
          f"{ratios['mailwarden_rspamd_vs_rspamd_alone']:.2f}x rspamd alone "
          f"(target >= 0.8x); with sender authentication {ratios['sender_auth_on_vs_peer']:.2f}x and "
          f"{ratios['sender_auth_on_vs_rspamd_alone']:.2f}x")
    print("CPU per message, milter + clamd + engine (Postfix not counted): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu.items()))
    print("per round: " + ", ".join(f"{k} {v}" for k, v in per_round.items()))
    for name, found in checks.items():
        print(f"  verdicts {name:<40} {found}")
    print(json.dumps({"results": [r.__dict__ for r in results.values()], "ratios": ratios, "cpu_ms": cpu,
                      "per_round": per_round, "rounds": {k: [r.e2e_rate for r in v] for k, v in runs.items()},
                      "verdicts": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
