"""Kill drills on the container cluster: mail sent from the Internet host keeps arriving,
once and only once, while one part of the cluster fails and comes back.

Each drill sends a known set of messages with unique Message-IDs from the Internet host's
Postfix (a real MTA that queues and retries a 4xx, as the Internet does) through the
balancer, one in ten carrying EICAR, to subscribers with virus and spam checking.  A few
seconds in, the fault is injected; it is undone after its hold time.  The drill then waits
(bounded) until every clean message is in a Maildir and the queues are empty, and counts:

- delivered: clean messages found in the recipients' Maildirs (INBOX or Junk);
- deferred then delivered: of those, the ones the Internet host's Postfix had deferred
  at least once (its log's ``status=deferred`` for the queue id of that Message-ID);
- lost: clean messages not delivered when the drill ends (must be 0);
- duplicated: copies beyond the first of any message;
- viruses delivered: EICAR messages found in a Maildir (must be 0);
- longest delay: from handing a message to the Internet host's sendmail to its Maildir
  file being written.

``python -m harness.drills`` starts a stack (or attaches to a running one with
``--stack NAME``), runs every drill (or those named) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.containers import Docker, MailStack, StackRun

# Subscribers with virus and spam checking (ldap/sample.ldif): example.jp's virus-scan and
# taro's spam-check; example.com's virus-scan and spam-check (alice's mail is archived too).
RECIPIENTS = ("taro@example.jp", "alice@example.com")
# Assembled here so that no virus scanner flags this file.
EICAR = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
VIRUS_EVERY = 10

# Runs on the Internet host: hands each message to its Postfix (sendmail -t), spread over
# the sending time, and prints "INDEX EPOCH" as each is queued.
_SENDER = r"""
import subprocess, sys, time
token, count, interval, virus_every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
recipients = sys.argv[5].split(",")
eicar = sys.stdin.read().strip()
start = time.time()
for i in range(count):
    # Two in a row to each: with the balancer's round robin, each recipient's mail
    # reaches every node.
    rcpt = recipients[(i // 2) % len(recipients)]
    virus = i % virus_every == virus_every - 1
    # Unique bodies: the milter's scan cache (by body digest) must not answer for clamd.
    body = f"{eicar}\n{token} {i}\n" if virus else f"drill {token} message {i} of {count}\n"
    text = (f"From: drill-{token}@outside.test\nTo: {rcpt}\nSubject: drill {token} {i}\n"
            f"Message-ID: <drill-{token}-{i:03d}@outside.test>\n\n{body}\n")
    subprocess.run(["/usr/sbin/sendmail", "-oi", "-f", f"drill-{token}@outside.test", rcpt],
                   input=text.encode(), check=True)
    print(i, "virus" if virus else "clean", time.time(), flush=True)
    time.sleep(max(0.0, start + (i + 1) * interval - time.time()))
"""


@dataclass(frozen=True)
class Fault:
    """What a drill breaks (``inject``) and how it comes back (``recover``) after ``hold`` s.

    ``setting`` names the configuration that decides how long the fault is felt."""

    name: str
    inject: Callable[[MailStack], None]
    recover: Callable[[MailStack], None]
    hold: float
    setting: Callable[[dict[str, str]], str] = lambda _settings: ""


@dataclass
class DrillResult:
    """One row of the drill table."""

    name: str
    sent: int = 0
    viruses_sent: int = 0
    delivered: int = 0
    deferred_then_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    viruses_delivered: int = 0
    longest_delay: float = 0.0
    setting: str = ""
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing duplicated, no virus delivered."""
        return self.lost == 0 and self.duplicated == 0 and self.viruses_delivered == 0


# --------------------------------------------------------------------------- faults


def _pids(stack: MailStack, host: str, pattern: str) -> list[str]:
    """PIDs of the processes in ``host`` whose command line matches ``pattern`` (a regex)."""
    listed = stack.exec(host, "ps", "-eo", "pid=,args=").stdout
    return [line.split(None, 1)[0] for line in listed.splitlines()
            if len(line.split(None, 1)) == 2 and re.search(pattern, line.split(None, 1)[1])]


def _kill(stack: MailStack, host: str, pattern: str) -> None:
    pids = _pids(stack, host, pattern)
    if not pids:
        raise RuntimeError(f"{host}: no process matches {pattern!r}")
    stack.exec(host, "kill", "-KILL", *pids, check=False)


def _start(stack: MailStack, host: str, daemon: str) -> None:
    """Start one of a host's daemons again, as mw-init starts it (``mw-daemon NAME``)."""
    stack.docker("exec", "-d", stack.container(host), "sh", "-c",
                 f"exec mw-daemon {daemon} >>/var/log/mailwarden/{daemon}.log 2>&1")


def _unix_answers(stack: MailStack, host: str, path: str) -> bool:
    """Whether a daemon accepts connections on the Unix socket ``path`` in ``host`` (the
    file of a killed one stays behind)."""
    probe = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
    return stack.exec(host, "python3", "-c", probe, check=False).returncode == 0


def _wait(what: str, ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not so after {timeout:g}s")
        time.sleep(0.5)


def _front_in_service(stack: MailStack, node: str) -> Callable[[], bool]:
    return lambda: all(status == "UP" for (_, server), status in stack.balancer_servers().items()
                       if server == node)


def _milter_down(stack: MailStack) -> None:
    _kill(stack, "front", r"mailwarden milter run")


def _milter_up(stack: MailStack) -> None:
    _start(stack, "front", "milter")
    socket = "/var/spool/postfix/mailwarden/milter.sock"
    _wait("milter socket", lambda: _unix_answers(stack, "front", socket), 30)


def _node_down(stack: MailStack) -> None:
    stack.stop("front2")


def _node_up(stack: MailStack) -> None:
    stack.start("front2")
    _wait("front2 back in the balancer", _front_in_service(stack, "front2"), 30)


def _primary_host(stack: MailStack) -> str:
    primary = stack.primary()
    return next(h for h in ("redis", "redis2") if stack.ip(h) == primary)


_killed_primary: list[str] = []


def _redis_down(stack: MailStack) -> None:
    host = _primary_host(stack)
    _killed_primary.append(host)
    stack.exec(host, "sh", "-c", "kill -KILL $(cat /run/redis-server.pid)")
    # The Sentinels promote the replica: hold until they name it (the drill's hold is extra).
    _wait("a new Redis primary", lambda: stack.primary() != stack.ip(host), 60)


def _redis_up(stack: MailStack) -> None:
    # Back as it started; the Sentinels make it a replica of the one they promoted.
    host = _killed_primary.pop()
    _start(stack, host, "redis")


def _ldap_down(stack: MailStack) -> None:
    stack.stop("ldap", timeout=10)


def _ldap_up(stack: MailStack) -> None:
    stack.start("ldap", timeout=60)


def _clamd_down(stack: MailStack) -> None:
    _kill(stack, "front", r"^clamd ")


def _clamd_up(stack: MailStack) -> None:
    _start(stack, "front", "clamd")
    _wait("clamd socket", lambda: _unix_answers(stack, "front", "/run/clamav/clamd.ctl"), 60)


def _spamd_down(stack: MailStack) -> None:
    _kill(stack, "front", r"spamd")


def _spamd_up(stack: MailStack) -> None:
    _start(stack, "front", "spamd")
    _wait("spamd", lambda: stack.exec("front", "sh", "-c", "spamc -K < /dev/null",
                                      check=False).returncode == 0, 60)


def _dns_down(stack: MailStack) -> None:
    for pid in _pids(stack, "dns", r"harness\.containers serve-dns"):
        stack.exec("dns", "kill", "-STOP", pid)


def _dns_up(stack: MailStack) -> None:
    for pid in _pids(stack, "dns", r"harness\.containers serve-dns"):
        stack.exec("dns", "kill", "-CONT", pid)


def _balancer(s: dict[str, str]) -> str:
    return (f"checks every {s['BALANCER_CHECK_INTER']}, out after {s['BALANCER_CHECK_FALL']} failed, "
            f"connect timeout {s['BALANCER_CONNECT_TIMEOUT']} then another node")


def _sentinel(s: dict[str, str]) -> str:
    return (f"down-after-milliseconds {s['SENTINEL_DOWN_AFTER_MS']}, "
            f"failover-timeout {s['SENTINEL_FAILOVER_TIMEOUT_MS']}")


FAULTS: tuple[Fault, ...] = (
    Fault("milter SIGKILLed on one node, restarted after 10 s", _milter_down, _milter_up, 10,
          lambda _s: "Postfix milter_default_action = tempfail: 451 4.7.1, the sender retries"),
    Fault("front node stopped for 20 s, started again", _node_down, _node_up, 20, _balancer),
    Fault("Redis primary SIGKILLed (Sentinel promotes the replica)", _redis_down, _redis_up, 5, _sentinel),
    Fault("LDAP provider stopped for 20 s", _ldap_down, _ldap_up, 20,
          lambda _s: "ldap uri: provider, then consumer; network_timeout 2 s, timeout 3 s"),
    Fault("clamd SIGKILLed on one node, restarted after 10 s", _clamd_down, _clamd_up, 10,
          lambda _s: "virus_failure_action = tempfail: 451 4.7.1"),
    Fault("spamd SIGKILLed on one node, restarted after 10 s", _spamd_down, _spamd_up, 10,
          lambda _s: "spam_failure_action = tempfail: 451 4.7.1"),
    Fault("stub DNS stops answering for 30 s", _dns_down, _dns_up, 30,
          lambda _s: "the Internet host finds no MX and retries; the nodes' lookups time out "
                     "(dns timeout 2 s)"),
)
SHORT_NAMES = ("milter", "node", "redis", "ldap", "clamd", "spamd", "dns")
BY_NAME = dict(zip(SHORT_NAMES, FAULTS, strict=True))


# --------------------------------------------------------------------------- one drill


def run_drill(stack: MailStack, fault: Fault, *, count: int = 40, interval: float = 0.5,
              inject_after: float = 4.0, settle: float = 180.0) -> DrillResult:
    """Send ``count`` messages ``interval`` s apart, break ``fault`` ``inject_after`` s in,
    undo it after its hold, and count what arrived (waiting at most ``settle`` s after
    the last message was sent)."""
    started = time.monotonic()
    token = secrets.token_hex(4)
    stack.forget_reputation()
    internet_log = stack.log_size("internet")
    sender = subprocess.Popen(
        [stack.docker.cli, "exec", "-i", stack.container("internet"), "python3", "-c", _SENDER, token,
         str(count), str(interval), str(VIRUS_EVERY), ",".join(RECIPIENTS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=stack.docker.env)
    assert sender.stdin is not None
    sender.stdin.write(EICAR)
    sender.stdin.close()
    time.sleep(inject_after)
    fault.inject(stack)
    time.sleep(fault.hold)
    fault.recover(stack)
    assert sender.stdout is not None and sender.stderr is not None
    sender.wait(timeout=count * interval + 120)
    out, err = sender.stdout.read(), sender.stderr.read()
    if sender.returncode != 0:
        raise RuntimeError(f"sending failed ({sender.returncode}): {err[-2000:]}")
    sent: dict[str, tuple[bool, float]] = {}
    for line in out.splitlines():
        index, kind, when = line.split()
        sent[f"<drill-{token}-{int(index):03d}@outside.test>"] = (kind == "virus", float(when))
    clean = {mid for mid, (virus, _) in sent.items() if not virus}

    def found() -> dict[str, list[float]]:
        return _delivered(stack, token)

    deadline = time.monotonic() + settle
    while True:
        copies = found()
        queued = stack.queue("internet") + stack.front_queue()
        if (clean <= copies.keys() and not queued) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    result = DrillResult(fault.name, sent=len(sent), viruses_sent=len(sent) - len(clean),
                         setting=fault.setting(stack.settings()))
    deferred = _deferred(stack.log("internet")[internet_log:])
    for mid in clean:
        if mid not in copies:
            result.lost += 1
            result.missing.append(mid)
            continue
        result.delivered += 1
        result.duplicated += len(copies[mid]) - 1
        result.deferred_then_delivered += mid in deferred
        result.longest_delay = max(result.longest_delay, min(copies[mid]) - sent[mid][1])
    for mid in sent.keys() - clean:
        if mid in copies:
            result.viruses_delivered += 1
            result.duplicated += len(copies[mid]) - 1
    result.seconds = time.monotonic() - started
    return result


_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)


def _delivered(stack: MailStack, token: str) -> dict[str, list[float]]:
    """Message-ID -> the times its copies were written, in every recipient's INBOX and Junk."""
    copies: dict[str, list[float]] = {}
    marker = f"drill-{token}-".encode()
    for rcpt in RECIPIENTS:
        for folder in ("", "Junk"):
            base = stack.maildir(rcpt, folder)
            for sub in ("new", "cur"):
                directory = base / sub
                if not directory.is_dir():
                    continue
                for path in directory.iterdir():
                    with contextlib.suppress(FileNotFoundError):  # moved new/ -> cur/ meanwhile
                        head = path.read_bytes()[:8192]
                        written = path.stat().st_mtime
                        found = _MESSAGE_ID.search(head)
                        if found and marker in found.group(1):
                            copies.setdefault(found.group(1).decode(), []).append(written)
    return copies


def _deferred(internet_log: str) -> set[str]:
    """Message-IDs the Internet host's Postfix deferred at least once (per its log)."""
    ids = dict(re.findall(r" (\w+): message-id=(<[^>]+>)", internet_log))
    queue_ids = set(re.findall(r" (\w+): to=<[^>]+>, .*status=deferred", internet_log))
    return {ids[q] for q in queue_ids if q in ids}


# --------------------------------------------------------------------------- the table


def table(results: Sequence[DrillResult]) -> str:
    """The drill table (Markdown)."""
    lines = [
        "| drill | sent (viruses) | delivered | deferred, then delivered | lost | duplicated "
        "| viruses delivered | longest delay | what decides it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.sent} ({r.viruses_sent}) | {r.delivered} | {r.deferred_then_delivered} "
            f"| {r.lost} | {r.duplicated} | {r.viruses_delivered} | {r.longest_delay:.1f} s | {r.setting} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.drills [--stack NAME] [DRILL...]``: run the drills, print the table."""
    parser = argparse.ArgumentParser(prog="python -m harness.drills", description=__doc__.split("\n\n")[0])
    parser.add_argument("drills", nargs="*", metavar="DRILL",
                        help=f"which ({', '.join(SHORT_NAMES)}; default: all)")
    parser.add_argument("--stack", help="a running stack to use (e.g. mwdemo); default: start one")
    parser.add_argument("--count", type=int, default=40, help="messages per drill (default 40)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.drills) - set(SHORT_NAMES))
    if unknown:
        parser.error(f"unknown drill(s) {', '.join(unknown)}: choose from {', '.join(SHORT_NAMES)}")
    chosen = [BY_NAME[n] for n in (args.drills or SHORT_NAMES)]
    run: StackRun | None = None
    if args.stack:
        stack = MailStack.attach(Docker(Path(tempfile.mkdtemp(prefix="mw-drills-"))), args.stack)
    else:
        run = StackRun(Path(tempfile.mkdtemp(prefix="mw-drills-")))
        stack = run.start()
    results = []
    try:
        settings = stack.settings()
        for fault in chosen:
            result = run_drill(stack, fault, count=args.count)
            results.append(result)
            print(f"{fault.name}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.0f} s"
                  + (f"; missing {', '.join(result.missing)}" if result.missing else ""), flush=True)
    finally:
        if run is not None:
            run.close()
    print()
    print(table(results))
    print()
    print("Settings (cluster.env): " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
