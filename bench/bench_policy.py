"""Effective-policy lookups per second, cold (LDAP) and warm (cache), at 1,000 and 100,000
subscribers, measured side by side in one run against one real slapd per size.

Prints a table and one JSON line.  Usage: python -m bench.bench_policy [--sizes 1000,100000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The harness is not installed: it is imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.slapd import Database, SlapdServer
from mailwarden.config import parse_config
from mailwarden.ldapdir import LdapDirectory
from mailwarden.policy import AddressKind, PolicyResolver
from mailwarden.sampledata import synthetic_ldif, user_address


def measure(size: int, domains: int, cold_n: int, warm_n: int, workdir: Path) -> dict[str, float]:
    ldif = workdir / f"synthetic-{size}.ldif"
    with ldif.open("w", encoding="utf-8") as out:
        for chunk in synthetic_ldif(size, domains, seed=size):
            out.write(chunk)
    t0 = time.perf_counter()
    server = SlapdServer([Database("dc=mailwarden,dc=test", [ldif])], workdir=workdir / f"slapd-{size}")
    server.configure()
    load_s = time.perf_counter() - t0
    server.start()
    try:
        cfg = parse_config(
            f'[ldap]\nuri = "{server.uri}"\n[policy]\ncache_size = {size + 10}\n'
            "cache_ttl = 3600\n", "bench.toml",
        )
        resolver = PolicyResolver(LdapDirectory(cfg.ldap), cfg)
        rng = random.Random(42)
        addresses = [user_address(rng.randrange(size), domains) for _ in range(cold_n)]
        addresses = list(dict.fromkeys(addresses))  # distinct: every first lookup is cold
        for d in range(domains):  # warm the domain cache, as on a running node
            resolver.effective_policy(f"nobody@d{d:05d}.example")
        lat = []
        t0 = time.perf_counter()
        for a in addresses:
            s = time.perf_counter()
            p = resolver.effective_policy(a)
            lat.append(time.perf_counter() - s)
            assert p.kind is AddressKind.SUBSCRIBER
        cold_s = time.perf_counter() - t0
        warm_keys = [addresses[i % len(addresses)] for i in range(warm_n)]
        t0 = time.perf_counter()
        for a in warm_keys:
            resolver.effective_policy(a)
        warm_s = time.perf_counter() - t0
        lat.sort()
        return {
            "subscribers": size,
            "ldif_load_s": round(load_s, 2),
            "cold_lookups_per_s": round(len(addresses) / cold_s, 1),
            "cold_p50_ms": round(statistics.median(lat) * 1000, 3),
            "cold_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 3),
            "warm_lookups_per_s": round(warm_n / warm_s, 1),
        }
    finally:
        server.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--cold", type=int, default=5000, help="distinct cold lookups per size")
    ap.add_argument("--warm", type=int, default=200000, help="warm lookups per size")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="mw-bench-") as tmp:
        for size in sizes:
            results.append(measure(size, args.domains, args.cold, args.warm, Path(tmp)))
    print(f"{'subscribers':>12} {'load s':>8} {'cold/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'warm/s':>12}")
    for r in results:
        print(f"{r['subscribers']:>12} {r['ldif_load_s']:>8} {r['cold_lookups_per_s']:>10} "
              f"{r['cold_p50_ms']:>8} {r['cold_p99_ms']:>8} {r['warm_lookups_per_s']:>12}")
    small, large = results[0], results[-1]
    summary = {
        "bench": "effective_policy",
        "results": results,
        "warm_over_cold": round(large["warm_lookups_per_s"] / large["cold_lookups_per_s"], 1),
        "cold_large_over_small": round(large["cold_lookups_per_s"] / small["cold_lookups_per_s"], 3),
        "warm_large_over_small": round(large["warm_lookups_per_s"] / small["warm_lookups_per_s"], 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
