"""The policy daemon under load: requests/s and p50/p99 latency, side by side in one run.

* mailwarden policyd (``mailwarden policyd run``, ``workers`` processes) against a real
  slapd with N synthetic subscribers (1,000 and 100,000) and a store (SQLite; Redis over
  loopback TCP, as a cluster node reaches its shared Redis; Redis over a unix socket, as
  a single node reaches a local one)
  holding 1,000,000 POP-before-SMTP windows, with a warm policy cache:
  - ``submission``: SMTP-AUTH client, remote recipient (relay + sender ownership +
    rate-limit check at RCPT);
  - ``message``: the same plus END-OF-MESSAGE (rate counters incremented);
  - ``pop-before-smtp``: unauthenticated client with an open window, remote recipient.
* Peers from Debian doing comparable work, each against the same stub DNS data:
  postgrey (greylisting, first attempts) and postfix-policyd-spf-python (SPF of the
  envelope sender), against mailwarden with only its ``greylist`` / ``spf`` check.
  The peers run in a private network namespace whose only interface is loopback and
  whose /etc/resolv.conf points at a stub DNS server on 127.0.0.1:53, so they cannot
  reach the machine's resolver; they are reached over unix sockets.

The load generator is a separate process with C connections, each waiting for its
answer before sending the next request (as Postfix's smtpd does).  Prints a table,
the ratios and one JSON line.  Not part of the test suite.

Usage: python -m bench.bench_policyd [--sizes 1000,100000] [--backends sqlite,redis,redis-unix]

``--backends sentinel --sentinels HOST:PORT,... --nodes 1,2``: the store is a Redis reached
through its Sentinels over a network (the container stack's: ``make demo``, then its
redis, redis2 and dns hosts on port 26379), and the policy daemon runs as one node, then
as N nodes (each its own ``mailwarden policyd run``) behind a real HAProxy (TCP, round
robin) that the load generator connects to.  Every node runs on this machine, so N nodes
share its cores: read the overhead of the balancer and the network store, not scaling.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pickle
import random
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.cpumeter import CpuMeter  # noqa: E402
from harness.ports import free_port  # noqa: E402
from harness.redisserver import RedisServer  # noqa: E402
from harness.scrape import Scraper  # noqa: E402
from harness.slapd import Database, SlapdServer  # noqa: E402
from mailwarden.sampledata import synthetic_ldif, user_address  # noqa: E402
from mailwarden.store import SQLiteStore  # noqa: E402
from policyd.protocol import format_request  # noqa: E402

MAILWARDEN = str(Path(sys.executable).parent / "mailwarden")
DOMAINS = 100
BIT = {"pop_before_smtp": 4, "smtp_auth": 5, "greylisting": 8, "rate_limits": 9}
SPF_DOMAINS = 200


def has(i: int, service: str) -> bool:
    return bool((i % 1024) >> BIT[service] & 1)


def policy_request(**attrs: str) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "helo_name": "client.example", "queue_id": "", "client_name": "unknown",
            "recipient": "friend@remote.example", "sasl_username": "", "size": "0"}
    base.update(attrs)
    return format_request(base)


# ---------------------------------------------------------------- load generator (own process)


def load(spec: str, requests: list[bytes], connections: int, pinned: bool = False) -> dict[str, Any]:
    """Send every request once over ``connections`` connections; one in flight per connection.

    ``pinned``: request i goes over connection i % connections (otherwise over whichever
    connection is free first). The loop is epoll and bound methods by file descriptor,
    the answers' actions counted once at the end: it shares the cores with what it
    measures, and each microsecond it spends per request is one the daemons lack.
    """
    kind, _, where = spec.partition(":")
    socks = []
    for _ in range(connections):
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(where)
        else:
            host, _, port = where.rpartition(":")
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    total = len(requests)
    latencies: list[float] = []
    answers: list[bytes] = []
    epoll = select.epoll()
    recv = {s.fileno(): s.recv for s in socks}
    send = {s.fileno(): s.sendall for s in socks}
    started: dict[int, float] = {}
    pending = dict.fromkeys(recv, b"")
    queues: dict[int, list[bytes]] = {}
    if pinned:
        for k, s in enumerate(socks):
            queues[s.fileno()] = requests[k::connections][::-1]
    shared = requests[::-1]  # popped from the end: whichever connection is free first

    def next_request(fd: int) -> bytes | None:
        queue = queues[fd] if pinned else shared
        return queue.pop() if queue else None

    t0 = time.perf_counter()
    for fd in recv:
        first = next_request(fd)
        if first is not None:
            started[fd] = time.perf_counter()
            send[fd](first)
            epoll.register(fd, select.EPOLLIN)
    done = 0
    clock = time.perf_counter
    while done < total:
        events = epoll.poll(30)
        if not events:
            raise TimeoutError("no answer within 30 s")
        for fd, _ in events:
            data = recv[fd](65536)
            if not data:
                raise ConnectionError("daemon closed a connection")
            buf = pending[fd] + data
            if b"\n\n" not in buf:
                pending[fd] = buf
                continue
            now = clock()
            # One answer per request in flight, so at most one complete block here.
            block, _, pending[fd] = buf.partition(b"\n\n")
            latencies.append(now - started[fd])
            answers.append(block)
            done += 1
            following = next_request(fd)
            if following is not None:
                started[fd] = now
                send[fd](following)
    elapsed = time.perf_counter() - t0
    epoll.close()
    for s in socks:
        s.close()
    latencies.sort()
    actions = Counter(block[7:].split(b" ", 1)[0].decode() for block in answers)
    return {
        "requests": total,
        "per_s": round(total / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "actions": dict(actions),
    }


def run_load(spec: str, requests: list[bytes], connections: int, work: Path,
             server_pids: tuple[int, ...] = (), pinned: bool = False) -> dict[str, Any]:
    """Run :func:`load` in a fresh process so the generator never shares a GIL with anything.

    ``server_pids``: processes (with their children) whose CPU time per request is reported,
    together (``server_cpu_us``) and the first one's alone (``own_cpu_us``: the daemon
    without its Redis).
    """
    job = work / "load.pickle"
    job.write_bytes(pickle.dumps((spec, requests, connections, pinned)))
    meters = [CpuMeter(f"policyd-{pid}", pid) for pid in server_pids]
    try:
        before = [meter.seconds() for meter in meters]
        out = subprocess.run([sys.executable, __file__, "--load-job", str(job)], capture_output=True,
                             text=True, check=True)
        result: dict[str, Any] = json.loads(out.stdout)
        if meters:
            used = [meter.seconds() - start for meter, start in zip(meters, before, strict=True)]
            result["server_cpu_us"] = round(sum(used) / len(requests) * 1e6, 1)
            result["own_cpu_us"] = round(used[0] / len(requests) * 1e6, 1)
    finally:
        for meter in meters:
            meter.close()
    return result


# ---------------------------------------------------------------- our daemon


def start_daemon(work: Path, name: str, config: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = work / f"{name}.sock"
    path = work / f"{name}.toml"
    path.write_text(config.replace("@SOCK@", str(sock)))
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen([MAILWARDEN, "--config", str(path), "policyd", "run"],
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    wait_for_socket(sock, proc)
    return proc, f"unix:{sock}"


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                return
            except OSError:
                pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{sock}: daemon exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{sock}: nobody listening after 30 s")


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


THREADS = 8


def daemon_config(ldap_uri: str, store: str, dns_port: int, checks: list[str], workers: int,
                  metrics_port: int = 0) -> str:
    metrics = f'metrics_listen = "127.0.0.1:{metrics_port}"' if metrics_port else ""
    return f"""
[general]
log_level = "info"
[ldap]
uri = "{ldap_uri}"
[policy]
cache_ttl = 3600
negative_cache_ttl = 3600
domain_cache_ttl = 3600
{store}
[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
[policyd]
listen = ["unix:@SOCK@"]
login_report_listen = []
trusted_networks = []
workers = {workers}
threads = {THREADS}
checks = {json.dumps(checks)}
{metrics}
"""


WARM_ROUNDS = 8


def warm_every_worker(spec: str, warm: list[bytes], connections: int, work: Path) -> dict[str, Any]:
    """Send each warm-up request over several connections, so every worker's cache has it.

    Each connection is served by one worker; round r sends request i over connection
    (i + 3r) mod C, so each request reaches WARM_ROUNDS distinct connections. Returns the
    first round's figures (the cold cache).
    """
    cold = run_load(spec, warm, connections, work)
    for r in range(1, WARM_ROUNDS):
        shift = (3 * r) % connections
        rotated = warm[-shift:] + warm[:-shift] if shift else warm
        run_load(spec, rotated, connections, work, pinned=True)
    return cold


def load_pbs_windows(backend: str, store_section: dict[str, str], users: list[str], count: int) -> None:
    """Bulk-load ``count`` POP-before-SMTP windows (10.0.0.0/8 addresses) for ``users``."""
    ttl = 86400.0
    if backend == "sqlite":
        path = store_section["sqlite_path"]
        SQLiteStore(path).close()  # creates the schema
        conn = sqlite3.connect(path)
        expires = time.time() + ttl
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO kv (key, kind, value, expires) VALUES (?, 0, ?, ?)",
                ((f"pbs:{ipaddress.IPv4Address(0x0A000000 + j)}", users[j % len(users)], expires)
                 for j in range(count)),
            )
        conn.close()
        check = SQLiteStore(path)
        assert check.get("pbs:10.0.0.1") == users[1 % len(users)], "store schema changed?"
        check.close()
    else:
        import redis

        client = redis.Redis.from_url(store_section["redis_url"])
        prefix = store_section["key_prefix"]
        pipe = client.pipeline(transaction=False)
        for j in range(count):
            pipe.set(f"{prefix}pbs:{ipaddress.IPv4Address(0x0A000000 + j)}", users[j % len(users)],
                     px=int(ttl * 1000))
            if j % 10000 == 9999:
                pipe.execute()
        pipe.execute()
        client.close()


def haproxy_in_front(work: Path, ports: list[int]) -> tuple[subprocess.Popen[bytes], str]:
    """A real HAProxy (TCP, round robin) on loopback in front of policy daemons at ``ports``."""
    listen = free_port()
    servers = "".join(f"  server node{i} 127.0.0.1:{port}\n" for i, port in enumerate(ports))
    conf = work / "haproxy.cfg"
    conf.write_text("defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n"
                    "  timeout server 60s\n"
                    f"frontend policy\n  bind 127.0.0.1:{listen}\n  default_backend nodes\n"
                    f"backend nodes\n  balance roundrobin\n{servers}")
    proc = subprocess.Popen([shutil.which("haproxy", path="/usr/sbin:/usr/bin") or "haproxy", "-db", "-f",
                             str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=0.5).close()
            return proc, f"tcp:127.0.0.1:{listen}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop(proc)
                raise RuntimeError("haproxy did not come up") from None
            time.sleep(0.1)


def sentinel_store(sentinels: list[str]) -> tuple[dict[str, str], str]:
    """The store section (for load_pbs_windows) and [store] text of a Sentinel-watched Redis."""
    from redis.sentinel import Sentinel

    hosts = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in sentinels)]
    host, port = Sentinel(hosts, socket_timeout=2).discover_master("mymaster")
    prefix = "mwbench:"  # apart from the stack's own keys
    listed = ", ".join(f'"{s}"' for s in sentinels)
    store = (f'[store]\nbackend = "redis"\nredis_url = "redis://{host}:{port}/0"\nsentinels = [{listed}]\n'
             f'sentinel_service = "mymaster"\nkey_prefix = "{prefix}"\n')
    return {"redis_url": f"redis://{host}:{port}/0", "key_prefix": prefix}, store


def measure_size(
    size: int, backends: list[str], args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    ldif = work / f"synthetic-{size}.ldif"
    with ldif.open("w", encoding="utf-8") as out:
        for chunk in synthetic_ldif(size, DOMAINS, seed=size):
            out.write(chunk)
    slapd = SlapdServer([Database("dc=mailwarden,dc=test", [ldif])], workdir=work / f"slapd-{size}")
    slapd.configure()
    slapd.start()
    rng = random.Random(size)
    working = sorted(rng.sample(range(size), min(size, args.working_set)))
    submitters = [user_address(i, DOMAINS) for i in working if has(i, "smtp_auth") and has(i, "rate_limits")]
    pbs_users = [user_address(i, DOMAINS) for i in working if has(i, "pop_before_smtp")]
    results = []
    try:
        runs = [(b, n) for b in backends for n in (args.nodes if b == "sentinel" else [1])]
        for backend, nodes in runs:
            redis_server = (RedisServer(unix_socket=backend == "redis-unix").start()
                            if backend.startswith("redis") else None)
            try:
                if backend == "sentinel":
                    section, store = sentinel_store(args.sentinels)
                elif redis_server is not None:
                    url = (f"unix://{redis_server.socket_path}" if redis_server.socket_path
                           else redis_server.url)
                    section = {"redis_url": url, "key_prefix": "mw:"}
                    store = f'[store]\nbackend = "redis"\nredis_url = "{url}"\n'
                else:
                    section = {"sqlite_path": str(work / f"state-{size}.sqlite3")}
                    store = f'[store]\nsqlite_path = "{section["sqlite_path"]}"\n'
                t0 = time.perf_counter()
                load_pbs_windows(backend, section, pbs_users, args.pbs)
                pbs_load_s = time.perf_counter() - t0
                config = daemon_config(slapd.uri, store, free_port(), ["relay", "sender_login", "reputation",
                                                                       "rate_limit", "spf", "greylist"],
                                       args.workers)
                daemons, ports = [], []
                for node in range(nodes):
                    ports.append(free_port())
                    # Also on TCP, for the balancer when there is more than one node.
                    listening = config.replace('listen = ["unix:@SOCK@"]',
                                               f'listen = ["unix:@SOCK@", "inet:127.0.0.1:{ports[-1]}"]')
                    daemons.append(start_daemon(work, f"ours-{size}-{backend}-{node}", listening))
                proc, spec = daemons[0]
                balancer = haproxy_in_front(work, ports) if nodes > 1 else None
                if balancer is not None:
                    spec = balancer[1]
                backend_name = f"sentinel/{nodes}" if backend == "sentinel" else backend
                try:
                    warm = [policy_request(sasl_username=u, sender=u, instance=f"w{i}")
                            for i, u in enumerate(submitters + pbs_users)]
                    cold = warm_every_worker(spec, warm, args.connections, work)
                    n = args.requests
                    sub = [policy_request(sasl_username=u, sender=u, client_address="198.51.100.1",
                                          instance=f"s{k}")
                           for k, u in ((k, submitters[rng.randrange(len(submitters))]) for k in range(n))]
                    msg: list[bytes] = []
                    for k in range(n // 2):
                        u = submitters[rng.randrange(len(submitters))]
                        who = {"sasl_username": u, "sender": u, "client_address": "198.51.100.1",
                               "instance": f"m{k}"}
                        msg.append(policy_request(**who))
                        msg.append(policy_request(protocol_state="END-OF-MESSAGE", recipient="",
                                                  recipient_count="1", size="2000", **who))
                    pbs = []
                    for k in range(n):
                        j = rng.randrange(args.pbs)
                        pbs.append(policy_request(client_address=str(ipaddress.IPv4Address(0x0A000000 + j)),
                                                  sender=pbs_users[j % len(pbs_users)], instance=f"p{k}"))
                    row = {"subscribers": size, "backend": backend_name, "pbs_windows": args.pbs,
                           "pbs_load_s": round(pbs_load_s, 1), "cold": cold}
                    pids = (proc.pid, *(d.pid for d, _ in daemons[1:]),
                            *((balancer[0].pid,) if balancer else ()),
                            *((redis_server.pid,) if redis_server and redis_server.pid else ()))
                    for name, reqs in (("submission", sub), ("message", msg), ("pop-before-smtp", pbs)):
                        row[name] = run_load(spec, reqs, args.connections, work, pids)
                    results.append(row)
                finally:
                    if balancer is not None:
                        stop(balancer[0])
                    for daemon, _ in daemons:
                        stop(daemon)
            finally:
                if backend == "sentinel":
                    import redis

                    client = redis.Redis.from_url(sentinel_store(args.sentinels)[0]["redis_url"])
                    for key in client.scan_iter(match="mwbench:*", count=10000):
                        client.delete(key)
                    client.close()
                if redis_server is not None:
                    redis_server.stop()
    finally:
        slapd.cleanup()
    return results


def measure_metrics(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The submission path with metrics off and on (scraped every second), in interleaved
    rounds against two daemons that run side by side: the medians and the cost in %."""
    size = 1000
    ldif = work / "synthetic-metrics.ldif"
    with ldif.open("w", encoding="utf-8") as out:
        for chunk in synthetic_ldif(size, DOMAINS, seed=size):
            out.write(chunk)
    slapd = SlapdServer([Database("dc=mailwarden,dc=test", [ldif])], workdir=work / "slapd-metrics")
    slapd.configure()
    slapd.start()
    rng = random.Random(size)
    submitters = [user_address(i, DOMAINS) for i in range(size)
                  if has(i, "smtp_auth") and has(i, "rate_limits")]
    checks = ["relay", "sender_login", "reputation", "rate_limit", "spf", "greylist"]
    metrics_port = free_port()
    daemons: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        for mode, port in (("off", 0), ("on", metrics_port)):
            store = f'[store]\nsqlite_path = "{work}/state-metrics-{mode}.sqlite3"\n'
            daemons[mode] = start_daemon(work, f"metrics-{mode}", daemon_config(
                slapd.uri, store, free_port(), checks, args.workers, port))
            warm = [policy_request(sasl_username=u, sender=u, instance=f"w{i}")
                    for i, u in enumerate(submitters)]
            warm_every_worker(daemons[mode][1], warm, args.connections, work)
        for r in range(args.metrics_rounds):
            picks = [submitters[rng.randrange(len(submitters))] for _ in range(args.metrics_requests)]
            sub = [policy_request(sasl_username=u, sender=u, client_address="198.51.100.1",
                                  instance=f"s{r}-{k}") for k, u in enumerate(picks)]
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                proc, spec = daemons[mode]
                if mode == "off":
                    rounds[mode].append(run_load(spec, sub, args.connections, work, (proc.pid,)))
                    continue
                with Scraper(f"http://127.0.0.1:{metrics_port}/metrics") as scraper:
                    rounds[mode].append(run_load(spec, sub, args.connections, work, (proc.pid,)))
                if not scraper.scrapes:
                    raise RuntimeError("/metrics was never scraped")
    finally:
        for proc, _ in daemons.values():
            stop(proc)
        slapd.cleanup()

    def median(mode: str, key: str) -> float:
        return float(statistics.median(row[key] for row in rounds[mode]))

    def pair_median(key: str) -> float:
        """The median over rounds of on / off: each pair ran back to back, so what the
        machine's other work does to both cancels better than in the medians apart."""
        pairs = zip(rounds["off"], rounds["on"], strict=True)
        return float(statistics.median(b[key] / a[key] for a, b in pairs))

    return {"per_s_off": median("off", "per_s"), "per_s_on": median("on", "per_s"),
            "rate_cost_pct": round(100 * (1 - pair_median("per_s")), 2),
            "cpu_us_off": median("off", "server_cpu_us"), "cpu_us_on": median("on", "server_cpu_us"),
            "cpu_cost_pct": round(100 * (pair_median("server_cpu_us") - 1), 2),
            "p99_ms_off": median("off", "p99_ms"), "p99_ms_on": median("on", "p99_ms"), "rounds": rounds}


# ---------------------------------------------------------------- peers in a private network namespace


def spf_records() -> dict[str, dict[str, list[str]]]:
    return {f"s{d:03d}.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']} for d in range(SPF_DOMAINS)}


def peer_helper(work: Path) -> None:
    """Inside the private namespaces: loopback up, stub DNS on :53, postgrey, policyd-spf spawner."""
    from harness.dnsstub import StubDns

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(work / "resolv.conf"), "/etc/resolv.conf"], check=True)
    dns = StubDns(spf_records(), port=53).start()
    (work / "pg").mkdir(exist_ok=True)
    shutil.chown(work / "pg", "postgrey", "postgrey")
    children: list[subprocess.Popen[bytes]] = []
    children.append(subprocess.Popen([
        "/usr/sbin/postgrey", f"--unix={work}/postgrey.sock", "--socketmode=0666", f"--dbdir={work}/pg",
        "--user=postgrey", "--group=postgrey", f"--pidfile={work}/pg/postgrey.pid", "--hostname=bench",
        "--delay=300", "--quiet",
    ], stdout=subprocess.DEVNULL, stderr=(work / "postgrey.log").open("wb")))
    (work / "policyd-spf.conf").write_text(
        "debugLevel = 0\nHELO_reject = No_Check\nMail_From_reject = Fail\nTestOnly = 1\n"
        "skip_addresses = 127.0.0.0/8,::1\n"
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(work / "policyd-spf.sock"))
    listener.listen(128)
    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        listener.close()

    signal.signal(signal.SIGTERM, on_term)
    (work / "peers.ready").write_text("ok")
    # Like Postfix's spawn(8): one policyd-spf process per connection, on stdin/stdout.
    while not stopping:
        try:
            conn, _ = listener.accept()
        except OSError:
            break
        fd = conn.fileno()
        children.append(subprocess.Popen(["/usr/bin/policyd-spf", str(work / "policyd-spf.conf")],
                                         stdin=fd, stdout=fd, stderr=subprocess.DEVNULL))
        conn.close()
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    dns.stop()


def stub_dns_process(port: int) -> None:
    """A stub DNS server with the SPF records, as its own process."""
    from harness.dnsstub import StubDns

    StubDns(spf_records(), port=port).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


def measure_peers(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    peers_dir = work / "peers"
    peers_dir.mkdir()
    peers_dir.chmod(0o755)
    helper = subprocess.Popen(["unshare", "--net", "--mount", "--kill-child=SIGTERM", sys.executable,
                               __file__, "--peer-helper", str(peers_dir)])
    dns_port = free_port()
    stub = subprocess.Popen([sys.executable, __file__, "--stub-dns", str(dns_port)])
    size = 1000
    ldif = work / "peers.ldif"
    ldif.write_text("".join(synthetic_ldif(size, DOMAINS, seed=7)))
    slapd = SlapdServer([Database("dc=mailwarden,dc=test", [ldif])], workdir=work / "slapd-peers")
    slapd.configure()
    slapd.start()
    rng = random.Random(11)
    greylisted = [user_address(i, DOMAINS) for i in range(size) if has(i, "greylisting")]
    n = args.peer_requests
    results = []
    try:
        deadline = time.monotonic() + 30
        while not (peers_dir / "peers.ready").exists():
            if helper.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("peer namespace did not start")
            time.sleep(0.05)
        wait_for_socket(peers_dir / "postgrey.sock")
        store = f'[store]\nsqlite_path = "{work}/peers.sqlite3"\n'
        # greylisting: first attempts of distinct triplets (lookup, insert, defer)
        grey = [policy_request(client_address=f"203.0.{k // 250 % 250}.{k % 250 + 1}",
                               sender=f"news{k}@sender{k % 97}.example",
                               recipient=greylisted[rng.randrange(len(greylisted))], instance=f"g{k}")
                for k in range(n)]
        warm_grey = [policy_request(recipient=r, client_address="192.0.2.250", instance=f"wg{i}",
                                    sender=f"warm{i}@x.example") for i, r in enumerate(greylisted)]

        def side_by_side(work_name: str, check: str, requests: list[bytes], peer: str, peer_socket: str,
                         extra_pids: tuple[int, ...] = ()) -> None:
            """mailwarden with only ``check`` (warm caches), then the peer, on the same requests."""
            ours, spec = start_daemon(work, f"ours-{check}", daemon_config(slapd.uri, store, dns_port,
                                                                          [check], args.workers))
            try:
                warm_every_worker(spec, warm_grey, args.connections, work)
                results.append({"work": work_name, "server": "mailwarden",
                                **run_load(spec, requests, args.connections, work, (ours.pid, *extra_pids))})
            finally:
                stop(ours)
            results.append({"work": work_name, "server": peer,
                            **run_load(f"unix:{peers_dir}/{peer_socket}", requests, args.connections, work,
                                       (helper.pid,))})

        side_by_side("greylisting", "greylist", grey, "postgrey", "postgrey.sock")
        # SPF of the envelope sender: pass and fail, one evaluation per transaction
        spf = [policy_request(client_address=f"192.0.2.{k % 200 + 1}" if k % 2
                              else f"198.51.100.{k % 200 + 1}",
                              sender=f"user{k}@s{k % SPF_DOMAINS:03d}.example",
                              recipient=greylisted[rng.randrange(len(greylisted))], instance=f"f{k}")
               for k in range(n)]
        side_by_side("spf", "spf", spf, "policyd-spf", "policyd-spf.sock", (stub.pid,))
    finally:
        slapd.cleanup()
        stop(stub)
        stop(helper)
    return results


# ---------------------------------------------------------------- report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--backends", default="sqlite,redis,redis-unix")
    ap.add_argument("--pbs", type=int, default=1_000_000, help="POP-before-SMTP windows in the store")
    ap.add_argument("--working-set", type=int, default=20000, help="distinct subscribers in the load")
    ap.add_argument("--requests", type=int, default=60000, help="requests per measurement")
    ap.add_argument("--peer-requests", type=int, default=6000, help="requests per peer comparison")
    ap.add_argument("--connections", type=int, default=16, help="concurrent policy connections")
    ap.add_argument("--workers", type=int, default=2, help="policyd processes")
    ap.add_argument("--threads", type=int, default=8, help="policyd threads per process")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sentinels", default="", help="host:port,... of the Sentinels (backend sentinel)")
    ap.add_argument("--nodes", default="1", help="policy daemons behind HAProxy (backend sentinel): 1,2")
    ap.add_argument("--metrics", action="store_true",
                    help="also the submission path with metrics off and on (scraped every second)")
    ap.add_argument("--metrics-rounds", type=int, default=20, help="interleaved off/on rounds")
    ap.add_argument("--metrics-requests", type=int, default=10000, help="requests per metrics round")
    ap.add_argument("--load-job", help=argparse.SUPPRESS)
    ap.add_argument("--peer-helper", help=argparse.SUPPRESS)
    ap.add_argument("--stub-dns", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_job:
        spec, requests, connections, pinned = pickle.loads(Path(args.load_job).read_bytes())
        print(json.dumps(load(spec, requests, connections, pinned)))
        return 0
    if args.peer_helper:
        peer_helper(Path(args.peer_helper))
        return 0
    if args.stub_dns:
        stub_dns_process(args.stub_dns)
        return 0
    if os.geteuid() != 0 and not args.no_peers:
        ap.error("the peer comparison needs root (network namespace); use --no-peers")
    global THREADS
    THREADS = args.threads
    args.sentinels = [s for s in args.sentinels.split(",") if s]
    args.nodes = [int(n) for n in args.nodes.split(",") if n]
    if "sentinel" in args.backends.split(",") and not args.sentinels:
        ap.error("the sentinel backend needs --sentinels HOST:PORT,...")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mw-bench-policyd-"))
    work.chmod(0o755)
    try:
        rows = []
        for size in (int(s) for s in args.sizes.split(",") if s):
            rows += measure_size(size, args.backends.split(","), args, work)
        peers = [] if args.no_peers else measure_peers(args, work)
        metrics = measure_metrics(args, work) if args.metrics else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\n{args.workers} policyd workers, {args.connections} connections, "
          f"{args.pbs:,} POP-before-SMTP windows, warm cache; {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before / {load_after[0]:.2f} after; cpu us = server CPU per request "
          "(with Redis), own us = the daemon's alone")
    print(f"{'subscribers':>11} {'store':>10} {'path':>16} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'cpu us':>7} {'own us':>7}  answers")
    for r in rows:
        for path in ("cold", "submission", "message", "pop-before-smtp"):
            m = r[path]
            print(f"{r['subscribers']:>11,} {r['backend']:>10} {path:>16} {m['per_s']:>9,.0f} "
                  f"{m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f} {m.get('server_cpu_us', '-'):>7} "
                  f"{m.get('own_cpu_us', '-'):>7}  {m['actions']}")
    ratios: dict[str, float] = {}
    if peers:
        print(f"\n{'work':>12} {'server':>12} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'cpu us':>7}  answers")
        for p in peers:
            print(f"{p['work']:>12} {p['server']:>12} {p['per_s']:>9,.0f} {p['p50_ms']:>7.2f} "
                  f"{p['p99_ms']:>7.2f} {p.get('server_cpu_us', '-'):>7}  {p['actions']}")
        by = {(p["work"], p["server"]): p for p in peers}
        ratios["greylisting_vs_postgrey"] = round(
            by["greylisting", "mailwarden"]["per_s"] / by["greylisting", "postgrey"]["per_s"], 2)
        ratios["spf_vs_policyd_spf"] = round(
            by["spf", "mailwarden"]["per_s"] / by["spf", "policyd-spf"]["per_s"], 2)
    sizes = sorted({r["subscribers"] for r in rows})
    for backend in sorted({r["backend"] for r in rows}):
        picked = {r["subscribers"]: r for r in rows if r["backend"] == backend}
        if len(sizes) > 1 and sizes[0] in picked and sizes[-1] in picked:
            small, large = picked[sizes[0]], picked[sizes[-1]]
            ratios[f"submission_large_over_small_{backend}"] = round(
                large["submission"]["per_s"] / small["submission"]["per_s"], 3)
            ratios[f"submission_p99_large_over_small_{backend}"] = round(
                large["submission"]["p99_ms"] / small["submission"]["p99_ms"], 3)
    if metrics is not None:
        print(f"\nmetrics (submission, 1,000 subscribers, SQLite, {args.metrics_rounds} interleaved rounds, "
              "medians; /metrics scraped every second):")
        print(f"{'metrics':>8} {'req/s':>9} {'p99 ms':>7} {'cpu us':>7}")
        for mode in ("off", "on"):
            print(f"{mode:>8} {metrics[f'per_s_{mode}']:>9,.0f} {metrics[f'p99_ms_{mode}']:>7.2f} "
                  f"{metrics[f'cpu_us_{mode}']:>7}")
        print(f"cost of metrics on (median of the rounds' on/off pairs): {metrics['rate_cost_pct']:+.1f} % "
              f"req/s, {metrics['cpu_cost_pct']:+.1f} % CPU per request")
        ratios["submission_metrics_on_vs_off"] = round(metrics["per_s_on"] / metrics["per_s_off"], 3)
    if ratios:
        print("\nratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print(json.dumps({"bench": "policyd", "workers": args.workers, "connections": args.connections,
                      "cpus": os.cpu_count(), "loadavg": [load_before[0], load_after[0]],
                      "results": rows, "peers": peers, "metrics": metrics, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
