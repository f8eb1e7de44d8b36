"""What keeping the legacy POP3 UIDLs costs a mailbox copy: ``mailwarden migrate``'s copy
(:class:`DoveadmMailboxes`, ``doveadm backup -R`` over imapc) of one mailbox of N messages
from a legacy Dovecot presenting qmail-style UIDLs (``%f``, the Maildir file name), with
the UIDLs fetched over pop3c (the ``pop3_migration`` plugin) and derived (no POP3), rounds
interleaved, each its own mailbox.  It checks that the fetched copy serves the legacy
UIDLs and the derived one does not.

Prints a table and one JSON line.  Usage: python -m bench.bench_migrate_uidls [-n 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import poplib
import smtplib
import statistics
import sys
import time
from pathlib import Path

# The harness is not installed: it is imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.legacy import LegacyMailServer, password_hash
from mailwarden.migrate import DoveadmMailboxes, LegacyServer

DOMAIN = "old.example"


def uidls(port: int, user: str, password: str) -> list[str]:
    """The UIDL list a POP3 client sees."""
    pop = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user(user)
        pop.pass_(password)
        return [line.decode().split()[1] for line in pop.uidl()[1]]
    finally:
        pop.quit()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_migrate_uidls")
    parser.add_argument("-n", type=int, default=500, help="messages in the mailbox")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    users = [f"u{r}{mode}@{DOMAIN}" for r in range(args.rounds) for mode in ("f", "d")]
    hashed = password_hash("SHA512-CRYPT", "pw")
    source = LegacyMailServer(dict.fromkeys(users, hashed), pop3_uidl_format="%f").start()
    target = LegacyMailServer(dict.fromkeys(users, hashed)).start()  # the new mailbox host
    times: dict[str, list[float]] = {"fetched": [], "derived": []}
    try:
        body = "x" * 2000
        with smtplib.LMTP("127.0.0.1", source.lmtp_port) as lmtp:
            for user in users:
                for i in range(args.n):
                    lmtp.sendmail("s@outside.example", [user],
                                  f"Subject: {i}\r\nMessage-ID: <{i}@outside.example>\r\n\r\n{body}\r\n")
        for user in users:
            fetched = user.split("@")[0].endswith("f")
            legacy = uidls(source.pop3_port, user, "pw")
            server = LegacyServer("127.0.0.1", source.imap_port, source.master_user,
                                  source.master_password, pop3_port=source.pop3_port if fetched else 0)
            boxes = DoveadmMailboxes(server, config=str(target.conf_path))
            started = time.perf_counter()
            boxes.pull(user, exact=True)
            times["fetched" if fetched else "derived"].append(time.perf_counter() - started)
            served = uidls(target.pop3_port, user, "pw")
            assert len(served) == args.n, (user, len(served))
            assert (served == legacy) == fetched, (user, served[:2], legacy[:2])
    finally:
        source.cleanup()
        target.cleanup()
    print(f"one mailbox of {args.n} messages (2 KB), legacy UIDLs qmail-style (Maildir file names)")
    print(f"{'UIDLs':<10}{'median s':>10}{'runs':>30}  served = legacy")
    for mode, values in times.items():
        print(f"{mode:<10}{statistics.median(values):>10.2f}{', '.join(f'{v:.2f}' for v in values):>30}"
              f"  {'yes' if mode == 'fetched' else 'no'}")
    print(json.dumps({"bench": "migrate_uidls", "messages": args.n,
                      **{f"{m}_median_s": round(statistics.median(v), 3) for m, v in times.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
