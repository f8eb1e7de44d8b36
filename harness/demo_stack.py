"""The whole mail topology in containers, with the sample directory: ``make demo``.

``up`` builds the images if needed (the same recipe and images as the container test
suite: debootstrap, ``docker import``, deploy/container/Containerfile), starts the
stack named ``mwdemo`` and prints how to send mail and where to watch it; ``down``
removes it and stops dockerd if ``up`` started it.  ``mail ADDRESS [FOLDER]`` lists
what a mailbox (or the Internet host, for ``@outside.test``) holds.  State lives in
``.state/demo-stack``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.containers import (
    ADMIN_ENV,
    BALANCER_WEB_PORT,
    HOSTS,
    INTERNET_MAIL,
    SERVICE_DN,
    ContainerError,
    Docker,
    Images,
    MailStack,
    read_maildir,
    remove_stack,
    stacks,
)
from harness.slapd import REPO

STATE = Path(os.environ.get("MAILWARDEN_DEMO_STACK_DIR", REPO / ".state" / "demo-stack"))
NAME = "mwdemo"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _docker() -> Docker:
    return Docker(STATE / "docker")


def up() -> int:
    """Start the stack (fresh each time) and print how to use it."""
    down(quiet=True)
    docker = _docker()
    try:
        docker.ensure_running()
        print("building or reusing the images (a few minutes the first time) ...", flush=True)
        image = Images(docker, STATE / "build").stack()
        stack = MailStack(docker, image, STATE / "stack", owner=0, name=NAME,
                          net=os.environ.get("MAILWARDEN_CONTAINER_NET"))
        stack.up()
    except (ContainerError, OSError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        if docker.answers():
            remove_stack(docker, NAME)
        docker.stop()
        return 1
    print(_instructions(stack))
    return 0


def _instructions(stack: MailStack) -> str:
    ip = stack.ip
    logs = os.path.relpath(stack.logdir, Path.cwd())
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) \
        else sys.executable
    me = f"{python} -m harness.demo_stack"
    admin = " ".join(ADMIN_ENV)
    return f"""
mailwarden demo stack '{NAME}' is up: {len(stack.started)} containers on the private network {stack.net}.0/24.
This machine reaches them at these addresses; nothing inside can reach anything else.

  balancer    {ip('balancer'):<13} {HOSTS['balancer'].hostname:<20} HAProxy, the MX and the clients' address:
                                                 MX 25, submission 587/465, POP-before-SMTP 2525,
                                                 POP3 110/995, IMAP 143/993, round robin to the front nodes
  front nodes {ip('front'):<13} {HOSTS['front'].hostname:<20} Postfix, Dovecot proxy, policy daemon,
              {ip('front2'):<13} {HOSTS['front2'].hostname:<20} milter, clamd, {stack.spam_engine}, console
                                                 (behind the balancer; MW_SPAM_ENGINE=rspamd picks rspamd)
  mailbox A   {ip('mbox1'):<13} {HOSTS['mbox1'].hostname:<20} Dovecot LMTP, POP3, IMAP, quota-status; Postfix
  mailbox B   {ip('mbox2'):<13} {HOSTS['mbox2'].hostname:<20} (hanako@example.jp, prof@lab.example.org)
  slapd       {ip('ldap'):<13} ldap://{ip('ldap')}/  base dc=mailwarden,dc=test (the provider)
                            root DN cn=admin,dc=mailwarden,dc=test / secret; the daemons bind as
                            {SERVICE_DN} / secret;
                            the shipped access rules (ldap/acl.ldif): anonymous clients see nothing
              {ip('ldap2'):<13} its syncrepl consumer
  redis       {ip('redis'):<13} shared state (POP-before-SMTP windows, rate limits, reputation): the primary,
              {ip('redis2'):<13} the replica; Sentinels on both and on the stub DNS's host (port 26379)
  prometheus  {ip('prometheus'):<13} http://{ip('prometheus')}:9090/ scraping both nodes' daemons
  stub DNS    {ip('dns'):<13} the only resolver anything in the stack uses
  Internet    {ip('internet'):<13} {HOSTS['internet'].hostname:<20} receives every @outside.test address

The web console (mailwarden web run on both front nodes, round robin behind the balancer):
  http://{ip('balancer')}:{BALANCER_WEB_PORT}/
  logins (password secret): root (system administrator), desk (helpdesk),
  jp-admin (example.jp), com-admin (example.com), taro@example.jp (a subscriber)

Send mail (passwords of the sample subscribers: secret):
  swaks --server {ip('balancer')} --from you@elsewhere.test --to taro@example.jp --header 'Subject: hello'
  swaks --server {ip('balancer')} --from you@elsewhere.test --to taro@example.jp --body '{GTUBE}'
  swaks --server {ip('balancer')} --port 587 --tls --auth-user taro@example.jp --auth-password secret \\
        --from taro@example.jp --to friend@outside.test
  docker exec {stack.container('internet')} swaks --server mx.mailwarden.test \\
        --from alice@outside.test --to prof@lab.example.org

Sender authentication (example.com signs: its DKIM key was made at start, and the stub DNS
publishes it; bank.test, on the Internet, has DMARC p=reject):
  swaks --server {ip('balancer')} --port 587 --tls --auth-user alice@example.com --auth-password secret \\
        --from alice@example.com --to friend@outside.test --header 'Subject: signed'
  docker exec {stack.container('internet')} sh -c \\
        'dkimverify < "$(ls -t {INTERNET_MAIL}/outside.test/new/* | head -n 1)"'
  docker exec {stack.container('internet')} swaks --server mx.mailwarden.test --from mailer@outside.test \\
        --to taro@example.jp,prof@lab.example.org --header 'From: security@bank.test'
        (refused for taro: example.jp honours DMARC; delivered with dmarc=fail to prof:
         lab.example.org only tags)

The archive (example.com keeps every message to or from it, with its envelope, in the
mailbox archive@example.com on mbox1, before the front node accepts it):
  docker exec {stack.container('front')} mailwarden archive search example.com --from alice@example.com
  docker exec {stack.container('front')} mailwarden archive search example.com --to bob@example.com --json

Read it:
  {me} mail taro@example.jp          (INBOX; add Junk for the Junk folder)
  {me} mail friend@outside.test      (what reached the Internet host)
  openssl s_client -quiet -starttls pop3 -connect {ip('balancer')}:110    (USER taro@example.jp, PASS secret)

Watch it (one directory per host; the front nodes share front/, each Postfix line names its node):
  cd {logs} && tail -f front/postfix.log front/milter.log front/policyd.log balancer/haproxy.log
  docker exec {stack.container('front')} mailwarden explain taro@example.jp
  docker exec {stack.container('front')} {admin} mailwarden user set taro@example.jp spam_threshold 3
        (a change acts as a system administrator: the daemons' account only reads)

Run the container test suite against it:
  MAILWARDEN_CONTAINER_STACK={NAME} .venv/bin/pytest tests/containers

Stop it with: make demo-stop
"""


def down(*, quiet: bool = False) -> int:
    """Remove the demo stack, and stop dockerd if ``up`` started it."""
    docker = _docker()
    started = docker.adopt()
    removed = False
    if docker.answers():
        removed = NAME in stacks(docker)
        remove_stack(docker, NAME)
    docker.stop()
    if not quiet:
        done = [f"stack {NAME}"] if removed else []
        done += ["dockerd"] if started else []
        print("stopped: " + (", ".join(done) if done else "nothing was running"))
    return 0


def mail(address: str, folder: str = "") -> int:
    """Print the messages of a subscriber's folder, or of an ``@outside.test`` address."""
    docker = _docker()
    try:
        stack = MailStack.attach(docker, NAME)
    except ContainerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    if address.lower().endswith("@outside.test"):
        messages = [m for m in read_maildir(stack.internet_maildir())
                    if address.lower() in [v.lower() for v in m.get_all("Delivered-To", [])]]
    else:
        messages = read_maildir(stack.maildir(address, folder))
    for message in messages:
        print(f"{message['Date']}  from {message['From']}  subject {message['Subject']}")
    print(f"{len(messages)} message(s) for {address}" + (f" in {folder}" if folder else ""))
    return 0


def main(argv: list[str]) -> int:
    """``python -m harness.demo_stack up|down|mail ADDRESS [FOLDER]``."""
    args = argv[1:]
    if args == ["up"]:
        return up()
    if args == ["down"]:
        return down()
    if args[:1] == ["mail"] and len(args) in (2, 3):
        return mail(*args[1:])
    print("usage: python -m harness.demo_stack up | down | mail ADDRESS [FOLDER]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
