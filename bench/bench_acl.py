"""What the shipped access rules cost the daemons' lookups: subscriber lookups per second on
the sample tree plus 1,000 synthetic subscribers, bound as the daemons' account under the
shipped rules (``mailwarden ldap acl``) against anonymous under one open read rule, two slapd
side by side, rounds interleaved.

Prints a table and one JSON line.  Usage: python -m bench.bench_acl [--rounds 7] [-n 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The harness is not installed: it is imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.slapd import SERVICE_BIND, SlapdServer, mailwarden_database
from mailwarden.config import parse_config
from mailwarden.ldapdir import LdapDirectory
from mailwarden.sampledata import synthetic_ldif, user_address

OPEN_RULES = ("to attrs=userPassword by anonymous auth by self write by * none", "to * by * read")
SUBSCRIBERS, DOMAINS = 1000, 10


def lookups_per_second(uri: str, bind: str, n: int) -> float:
    """``n`` domain + subscriber lookups, each on the daemons' path (no cache)."""
    cfg = parse_config(f'[ldap]\nuri = "{uri}"\n{bind}', "bench.toml")
    directory = LdapDirectory(cfg.ldap)
    addresses = [user_address(i, DOMAINS) for i in range(0, SUBSCRIBERS, 7)]
    t0 = time.perf_counter()
    for i in range(n):
        address = addresses[i % len(addresses)]
        domain = directory.find_domain(address.split("@", 1)[1])
        assert domain is not None and directory.find_user(address, domain) is not None
    elapsed = time.perf_counter() - t0
    directory.close()
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("-n", type=int, default=3000, help="lookups per round and variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mw-bench-acl-") as tmp:
        ldif = Path(tmp) / "synthetic.ldif"
        ldif.write_text("".join(synthetic_ldif(SUBSCRIBERS, DOMAINS, seed=1, with_base=False)),
                        encoding="utf-8")
        shipped = mailwarden_database(ldif)
        open_db = dataclasses.replace(shipped, access=OPEN_RULES)
        with SlapdServer([shipped]) as ruled, SlapdServer([open_db]) as plain:
            results: dict[str, list[float]] = {"shipped": [], "open": []}
            for _ in range(args.rounds):
                results["shipped"].append(lookups_per_second(ruled.uri, SERVICE_BIND, args.n))
                results["open"].append(lookups_per_second(plain.uri, "", args.n))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = statistics.median(s / o for s, o in zip(results["shipped"], results["open"], strict=True))
    print("| rules | bind | lookups/s (median) |\n|---|---|---|")
    print(f"| open (`to * by * read`) | anonymous | {med['open']:,.0f} |")
    print(f"| shipped (`mailwarden ldap acl`) | daemons' account | {med['shipped']:,.0f} |")
    print(f"| shipped / open (median of round pairs) | | {ratios:.2f}× |")
    print(json.dumps({"bench": "acl", "rounds": args.rounds, "n": args.n, "median": med,
                      "ratio": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
