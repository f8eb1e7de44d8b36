"""Two asyncio clamd clients side by side in one run: aioclamd and mailwarden's own.

Decides which client the milter should scan with.  One private clamd (the test
harness's ``ClamdServer``, local signatures only) serves both:

* ``aioclamd`` (``ClamdAsyncClient.instream``, the maintained asyncio client from PyPI),
  over TCP, the only transport it has, with its per-call ``timeout`` (30 s) set;
* mailwarden's ``milters.scanners.clamd.ClamdScanner`` over the same TCP port, and over
  clamd's unix socket (what the deployment uses).

For each message size (4 KiB: typical mail; 1 MiB and 3 MiB: mail with attachments;
MIME messages with a base64 attachment, every ``--eicar-every``-th one carrying the EICAR
test file as a second attachment) and each mode (``seq``: one scan at a time; ``conc``:
``--concurrency`` scans in flight), the scans run in rounds; each round runs the same
messages through every client in turn, the order rotating from round to round, so that
whatever else the machine does falls on all of them alike.  A cell stops after the
round that passes ``--budget`` seconds, with the same number of scans for every client.
An unmeasured warm-up round per cell opens mailwarden's clamd sessions (it keeps them
open between scans; aioclamd connects per scan).

Measured per scan, per client:

* client CPU: ``time.process_time()`` deltas of this process (every thread of it,
  aioclamd's worker threads included; clamd is another process and not in it);
* clamd CPU over the same rounds (cgroup where possible, else clock ticks), for scale;
* wall: mean time per scan (``seq``: a scan's latency; ``conc``: round time divided by
  its scans), and p50/p99 latency of single scans;
* verdicts: every client's (infected, signature) per message must agree with the others
  and with where EICAR was put.

Prints a table, the ratios (aioclamd CPU per scan / mailwarden's over TCP) and one JSON
line.  Not part of the test suite; needs ``pip install aioclamd`` (the ``bench`` extra).

Usage: python -m bench.bench_clamd_client [--quick] [--small 320] [--large 32]
       [--concurrency 8] [--loop uvloop|asyncio] [--budget 90]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.clamd import EICAR, ClamdServer  # noqa: E402
from harness.cpumeter import CpuMeter  # noqa: E402
from milters.scanners.clamd import ClamdScanner  # noqa: E402

try:
    import aioclamd
except ImportError:
    sys.exit("aioclamd is not installed: pip install 'mailwarden[bench]' (or pip install aioclamd)")

KIB = 1024
Verdict = tuple[bool, str]
Scan = Callable[[bytes], Awaitable[Verdict]]


# ---------------------------------------------------------------- messages


def message(size: int, seed: int, eicar: bool) -> bytes:
    """A MIME message of ``size`` bytes: a text part and a base64 attachment (and EICAR)."""
    rng = random.Random(seed)
    head = (
        f"From: sender{seed}@example.net\r\nTo: user@example.org\r\n"
        f"Subject: report {seed}\r\nMessage-ID: <{seed}.bench@example.net>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "Hello,\r\n\r\nplease find the file attached.\r\n\r\n"
    ).encode()
    tail = b"--b1--\r\n"
    if eicar:
        tail = (b"--b1\r\nContent-Type: application/octet-stream; name=\"eicar.com\"\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n"
                + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"\r\n" + tail)
    attach_head = (b"--b1\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\n")
    room = size - len(head) - len(attach_head) - len(tail)
    lines = bytearray()
    while len(lines) < room:
        lines += base64.b64encode(rng.randbytes(57)) + b"\r\n"  # 76 characters a line
    body = bytes(lines[:max(room - 2, 0)]) + b"\r\n"
    out = head + attach_head + body + tail
    assert len(out) == size, (len(out), size)
    return out


def messages(size: int, count: int, eicar_every: int) -> list[bytes]:
    """Message i of a cell: a few variants, EICAR in every ``eicar_every``-th."""
    clean = [message(size, seed, False) for seed in range(4)]
    infected = [message(size, 100 + seed, True) for seed in range(2)]
    return [infected[i // eicar_every % 2] if i % eicar_every == 0 else clean[i % 4] for i in range(count)]


# ---------------------------------------------------------------- clients


def ours(scanner: ClamdScanner) -> Scan:
    async def scan(data: bytes) -> Verdict:
        result = await scanner.scan(lambda: [data], time.monotonic() + 30)
        return result.infected, result.signature
    return scan


def theirs(client: aioclamd.ClamdAsyncClient) -> Scan:
    async def scan(data: bytes) -> Verdict:
        answer = await client.instream(io.BytesIO(data))
        status, signature = answer["stream"]
        return status == "FOUND", signature or ""
    return scan


# ---------------------------------------------------------------- measurement


async def run_round(scan: Scan, batch: list[tuple[int, bytes]], concurrency: int,
                    latencies: list[float], verdicts: dict[int, Verdict]) -> None:
    queue = iter(batch)

    async def worker() -> None:
        for index, data in queue:
            t0 = time.perf_counter()
            verdicts[index] = await scan(data)
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure_cell(clients: dict[str, Scan], size: int, mode: str, count: int, concurrency: int,
                       rounds: int, budget: float, eicar_every: int, clamd: CpuMeter) -> list[dict[str, Any]]:
    """One size and mode: every client through the same messages, round by round."""
    width = concurrency if mode == "conc" else 1
    per_round = max(math.ceil(count / rounds), width)
    msgs = messages(size, count, eicar_every)
    names = list(clients)
    stats: dict[str, dict[str, Any]] = {
        name: {"cpu": 0.0, "wall": 0.0, "clamd": 0.0, "lat": [], "verdicts": {}, "n": 0} for name in names}
    warm = [(-1 - i, msgs[i % len(msgs)]) for i in range(width)]
    for name in names:  # unmeasured: opens our sessions, starts aioclamd's worker threads
        await run_round(clients[name], warm, width, [], {})
    started = time.perf_counter()
    for r, first in enumerate(range(0, count, per_round)):
        batch = list(enumerate(msgs))[first:first + per_round]
        for name in names[r % len(names):] + names[:r % len(names)]:
            s = stats[name]
            gc.collect()
            c0, k0, w0 = time.process_time(), clamd.seconds(), time.perf_counter()
            await run_round(clients[name], batch, width, s["lat"], s["verdicts"])
            w1, c1, k1 = time.perf_counter(), time.process_time(), clamd.seconds()
            s["cpu"] += c1 - c0
            s["wall"] += w1 - w0
            s["clamd"] += k1 - k0
            s["n"] += len(batch)
        if time.perf_counter() - started > budget:
            break
    rows = []
    for name in names:
        s = stats[name]
        n, lat = s["n"], sorted(s["lat"])
        rows.append({
            "client": name, "size": size, "mode": mode, "concurrency": width, "scans": n,
            "cpu_us": round(s["cpu"] / n * 1e6, 1),
            "wall_ms": round(s["wall"] / n * 1e3, 3),
            "p50_ms": round(statistics.median(lat) * 1e3, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 3),
            "clamd_cpu_us": round(s["clamd"] / n * 1e6, 1),
            "found": sum(v[0] for v in s["verdicts"].values()),
            "verdicts": s["verdicts"],
        })
    # the verdicts: every client alike, and EICAR exactly where it was put
    reference = rows[0]["verdicts"]
    for row in rows:
        v = row.pop("verdicts")
        row["agree"] = v == reference and all(v[i][0] == (i % eicar_every == 0) for i in v)
    return rows


async def measure(args: argparse.Namespace, clamd: ClamdServer) -> list[dict[str, Any]]:
    mine_tcp = ClamdScanner([clamd.inet_address], timeout=30)
    mine_unix = ClamdScanner([clamd.unix_address], timeout=30)
    client = aioclamd.ClamdAsyncClient("127.0.0.1", clamd.port, timeout=30)
    clients = {"aioclamd tcp": theirs(client), "mailwarden tcp": ours(mine_tcp),
               "mailwarden unix": ours(mine_unix)}
    rows: list[dict[str, Any]] = []
    assert clamd.pid is not None
    meter = CpuMeter("clamd", clamd.pid)
    try:
        for size in args.sizes:
            count = args.small if size <= 64 * KIB else args.large
            for mode in ("seq", "conc"):
                cell = await measure_cell(clients, size, mode, count, args.concurrency, args.rounds,
                                          args.budget, args.eicar_every, meter)
                rows += cell
                for row in cell:
                    print(f"  {row['size'] // KIB:>5} KiB {row['mode']:>4} {row['client']:>16}: "
                          f"{row['scans']} scans, {row['cpu_us']:.0f} us CPU, {row['wall_ms']:.2f} ms",
                          file=sys.stderr, flush=True)
    finally:
        meter.close()
        mine_tcp.close()
        mine_unix.close()
    return rows


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fifth of the scans")
    ap.add_argument("--sizes", default="4096,1048576,3145728", help="message sizes in bytes")
    ap.add_argument("--small", type=int, default=320, help="scans per cell for messages up to 64 KiB")
    ap.add_argument("--large", type=int, default=32, help="scans per cell for larger messages")
    ap.add_argument("--concurrency", type=int, default=8, help="scans in flight in the conc mode")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per cell (clients take turns)")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds per cell, then it stops")
    ap.add_argument("--eicar-every", type=int, default=8, help="every N-th message carries EICAR")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop (the milter's default is uvloop)")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.quick:
        args.small, args.large = max(args.small // 5, 16), max(args.large // 5, 8)
        args.rounds = max(args.rounds // 2, 2)
    load_before = os.getloadavg()
    clamd = ClamdServer().start()
    try:
        if args.loop == "uvloop":
            import uvloop
            rows = uvloop.run(measure(args, clamd))
        else:
            rows = asyncio.run(measure(args, clamd))
    finally:
        clamd.cleanup()
    load_after = os.getloadavg()
    info = machine()
    print(f"\nclamd clients, one private clamd (MaxThreads 4), {args.loop} event loop; "
          f"{info['nproc']} CPUs ({info['cpu']}), load average {load_before[0]:.2f} before / "
          f"{load_after[0]:.2f} after; cpu = this process's CPU per scan, conc = "
          f"{args.concurrency} scans in flight, wall = time per scan")
    print(f"{'size':>8} {'mode':>4} {'client':>16} {'scans':>5} {'cpu us':>8} {'wall ms':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'clamd us':>9} {'found':>5}  verdicts")
    for r in rows:
        size = f"{r['size'] // KIB} KiB" if r["size"] < KIB * KIB else f"{r['size'] / KIB / KIB:g} MiB"
        print(f"{size:>8} {r['mode']:>4} {r['client']:>16} {r['scans']:>5} {r['cpu_us']:>8.0f} "
              f"{r['wall_ms']:>8.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['clamd_cpu_us']:>9.0f} "
              f"{r['found']:>5}  {'agree' if r['agree'] else 'DIFFER'}")
    by = {(r["size"], r["mode"], r["client"]): r for r in rows}
    ratios: dict[str, float] = {}
    for size in args.sizes:
        for mode in ("seq", "conc"):
            a, m = by[size, mode, "aioclamd tcp"], by[size, mode, "mailwarden tcp"]
            u = by[size, mode, "mailwarden unix"]
            key = f"{size // KIB}k_{mode}"
            ratios[f"cpu_aioclamd_over_ours_tcp_{key}"] = round(a["cpu_us"] / m["cpu_us"], 2)
            ratios[f"wall_aioclamd_over_ours_tcp_{key}"] = round(a["wall_ms"] / m["wall_ms"], 2)
            ratios[f"cpu_ours_unix_over_tcp_{key}"] = round(u["cpu_us"] / m["cpu_us"], 2)
    print("\nratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    agree = all(r["agree"] for r in rows)
    print(f"verdicts: {'every client agrees, EICAR found where it was put' if agree else 'DIFFER'}")
    print(json.dumps({"bench": "clamd_client", "loop": args.loop, "concurrency": args.concurrency,
                      "aioclamd": aioclamd.__version__, "machine": info,
                      "loadavg": [load_before[0], load_after[0]], "verdicts_agree": agree,
                      "results": rows, "ratios": ratios}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
