"""The mailwarden topology in real Docker containers, built locally from Debian packages.

No registry is reachable, so the base image is a Debian 12 root file system made with
``debootstrap --variant=minbase`` and ``docker import``; the stack image
(``deploy/container/Containerfile``) adds the Debian mail packages and mailwarden, from
wheels built on this machine.  Both are tagged with a hash of their inputs and reused
while the inputs are unchanged.

``dockerd`` is started only if none answers; then its PID is recorded, it is stopped at
the end, and the firewall changes it leaves behind (FORWARD policy DROP, DOCKER chains,
docker0, ip_forward) are undone.  The hosts run on a private ``--internal`` network, so
nothing in a container can reach any address outside it; this machine reaches them
through the network's bridge address.  Everything created carries the label
``org.mailwarden.stack`` and is removed by :meth:`MailStack.down` (also at exit).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import email.policy
import hashlib
import imaplib
import importlib.metadata
import ipaddress
import json
import os
import poplib
import re
import secrets
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

from harness.dnsstub import StubDns
from harness.postfix import SmtpResult, make_message
from harness.scrape import Samples, scrape

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "container"
SUITE = "bookworm"
MIRROR = os.environ.get("MAILWARDEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE_REPO = "mailwarden"
IMAGE_LABEL = "org.mailwarden.image=stack"  # set by the Containerfile
LABEL = "org.mailwarden.stack"
OWNER_LABEL = "org.mailwarden.owner"
CACHE = Path(os.environ.get("MAILWARDEN_CONTAINER_CACHE", Path.home() / ".cache" / "mailwarden"))
# What mailwarden's wheel is built from (also what the image tag hashes): the packages,
# the templates setup.py puts into the wheel, and the build files.
# The directory's schema, sample tree and access rules (generated from the catalogue).
LDAP_FILES = ("mailwarden.ldif", "sample.ldif", "acl.ldif")
SOURCE_DIRS = ("mailwarden", "milters", "policyd", "postfix-templates", "dovecot-templates")
SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
# Not in the wheel: the image carries a copy of the harness for the dns host's stub DNS
# (``mw-init dns`` runs ``python3 -m harness.containers serve-dns`` from it).
HARNESS = REPO / "harness"


class ContainerError(RuntimeError):
    """Docker, an image build or a container did not do what was asked."""


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _tree_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _tree_digest_parts(root: Path, base: Path) -> Iterator[bytes]:
    for path in _tree_files(root):
        yield str(path.relative_to(base)).encode()
        yield oct(path.stat().st_mode & 0o777).encode()
        yield path.read_bytes()


# --------------------------------------------------------------------------- dockerd


def _docker_cli() -> str:
    # Debian's client matches Debian's dockerd; another client on PATH may be newer.
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


class Docker:
    """The docker command against a daemon that answers, starting ``dockerd`` if none does.

    A daemon started here is recorded in ``workdir/dockerd.json`` (PID and the firewall
    state before it), so a later command can :meth:`adopt` and stop it (``make demo-stop``).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cli = _docker_cli()
        self.env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._firewall: dict[str, object] | None = None

    @property
    def started_here(self) -> bool:
        """Whether this object started (or adopted) the daemon, and so must stop it."""
        return self.pid is not None

    @property
    def record(self) -> Path:
        """Where the PID of a daemon started here and the firewall state before it are kept."""
        return self.workdir / "dockerd.json"

    def __call__(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS``; raise :class:`ContainerError` with its stderr when ``check``."""
        try:
            done = subprocess.run(
                [self.cli, *args], capture_output=True, text=True, input=input,
                timeout=timeout, env=self.env, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"docker {' '.join(args[:3])}: no answer in {timeout:g}s") from exc
        if check and done.returncode != 0:
            raise ContainerError(
                f"docker {' '.join(args[:4])} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def answers(self) -> bool:
        """Whether a daemon answers on the client's socket."""
        try:
            return self("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
        except ContainerError:
            return False

    def ensure_running(self, timeout: float = 60.0) -> None:
        """Use the running daemon, or start ``dockerd`` (no systemd here) and wait for it."""
        if self.answers():
            return
        dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
        if dockerd is None:
            raise ContainerError("dockerd not found: apt-get install docker.io debootstrap iptables")
        if os.geteuid() != 0:
            raise ContainerError("no Docker daemon answers, and starting dockerd needs root")
        self._firewall = _firewall_snapshot()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "dockerd.log").open("ab") as log:
            # Own session: dockerd must not hold the caller's terminal or output open.
            self._proc = subprocess.Popen(
                [dockerd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self.record.write_text(json.dumps({"pid": self.pid, "firewall": self._firewall}))
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "dockerd.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise ContainerError(f"dockerd did not come up; log tail:\n{tail}")
            time.sleep(0.2)

    def adopt(self) -> bool:
        """Take charge of the dockerd an earlier command recorded here, if it still runs."""
        try:
            recorded = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return False
        if not _is_dockerd(int(recorded["pid"])):
            self.record.unlink(missing_ok=True)
            return False
        self.pid, self._firewall = int(recorded["pid"]), recorded["firewall"]
        return True

    def stop(self) -> None:
        """Stop the daemon if this object started or adopted it; undo its firewall changes."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        if _is_dockerd(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _is_dockerd(pid) and time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    break
                time.sleep(0.1)
            if _is_dockerd(pid):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None
        if self._firewall is not None:
            _firewall_restore(self._firewall)
            self._firewall = None
        self.record.unlink(missing_ok=True)


def _is_dockerd(pid: int) -> bool:
    """Whether ``pid`` is (still) a dockerd, not a recycled PID."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and cmdline.split(b"\0")[0].endswith(b"dockerd")


def _run_quiet(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _firewall_snapshot() -> dict[str, object]:
    """What dockerd is about to change: FORWARD policy, ip_forward, docker0, DOCKER chains."""
    forward = _run_quiet("iptables", "-S", "FORWARD")
    policy = "DROP" if "-P FORWARD DROP" in forward else "ACCEPT"
    return {
        "forward_policy": policy,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "docker0": Path("/sys/class/net/docker0").exists(),
        "chains": "DOCKER" in _run_quiet("iptables", "-S") + _run_quiet("iptables", "-t", "nat", "-S"),
    }


def docker_leftovers(rules: str) -> list[list[str]]:
    """The iptables arguments that remove dockerd's rules and chains from one table's
    ``iptables -S`` listing: its jump and docker0 rules first, then its chains."""
    lines = rules.splitlines()
    commands = [["-D", *line[3:].split()] for line in lines
                if line.startswith("-A ") and ("DOCKER" in line or "docker0" in line)]
    for line in lines:
        if line.startswith("-N DOCKER"):
            chain = line.split()[1]
            commands += [["-F", chain], ["-X", chain]]
    return commands


def _firewall_restore(before: dict[str, object]) -> None:
    """Remove what a dockerd started here left behind, when it was not there before."""
    if not before["chains"]:
        for table in ("filter", "nat"):
            for args in docker_leftovers(_run_quiet("iptables", "-t", table, "-S")):
                subprocess.run(["iptables", "-t", table, *args], capture_output=True, check=False)
    if before["forward_policy"] == "ACCEPT":
        subprocess.run(["iptables", "-P", "FORWARD", "ACCEPT"], capture_output=True, check=False)
    if not before["docker0"] and Path("/sys/class/net/docker0").exists():
        subprocess.run(["ip", "link", "del", "docker0"], capture_output=True, check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/net/ipv4/ip_forward").write_text(f"{before['ip_forward']}\n")


# --------------------------------------------------------------------------- images


# Debian 12's Python, which runs mailwarden in the image: requirement markers are
# evaluated for it as well as for this interpreter (redis needs async-timeout before 3.11.3).
IMAGE_PYTHON = "3.11.2"


def runtime_requirements() -> list[str]:
    """What the image's ``pip`` installs: ``name==version`` of every distribution this
    environment has and mailwarden needs at run time, plus the plain requirement of any
    that only the image's Python needs.  mailwarden's own requirements are read from the
    checkout's pyproject.toml, not from the installed metadata, which an editable install
    leaves as it was when it was made."""
    # Imported here: the image (which runs this module's DNS stub) has no packaging.
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    image = {str(k): str(v) for k, v in default_environment().items()}
    image.update(python_full_version=IMAGE_PYTHON, python_version=IMAGE_PYTHON.rsplit(".", 1)[0],
                 extra="")
    pins: dict[str, str] = {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    while todo:
        req = todo.pop()
        if req.marker and not (req.marker.evaluate({"extra": ""}) or req.marker.evaluate(image)):
            continue
        key = canonicalize_name(req.name)
        if key in pins:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pins[key] = f"{req.name}{req.specifier}"
            continue
        pins[key] = f"{key}=={dist.version}"
        todo.extend(Requirement(r) for r in dist.requires or [])
    return sorted(pins.values())


class Images:
    """The base and stack images, built when no image with the inputs' hash exists."""

    def __init__(self, docker: Docker, workdir: Path, *, log: Path | None = None) -> None:
        self.docker = docker
        self.workdir = workdir
        self.log = log or workdir / "build.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def _exists(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=30).returncode == 0

    def _note(self, text: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def base(self) -> str:
        """``mailwarden/bookworm:HASH``: debootstrap minbase + ``docker import``."""
        tag = f"{IMAGE_REPO}/{SUITE}:{_digest([SUITE.encode(), b'minbase', MIRROR.encode()])}"
        if self._exists(tag):
            return tag
        debootstrap = shutil.which("debootstrap", path="/usr/sbin:/usr/bin")
        if debootstrap is None:
            raise ContainerError("debootstrap not found: apt-get install debootstrap")
        rootfs = Path(tempfile.mkdtemp(prefix="mw-rootfs-", dir=self.workdir))
        try:
            started = time.monotonic()
            with self.log.open("ab") as log:
                subprocess.run(
                    [debootstrap, "--variant=minbase", SUITE, str(rootfs), MIRROR],
                    stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900,
                )
            for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            self._note(f"debootstrap {SUITE}: {time.monotonic() - started:.1f}s")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            imported = subprocess.run(
                [self.docker.cli, "import", "--change", "ENV LANG=C.UTF-8", "-", tag],
                stdin=tar.stdout, capture_output=True, text=True, env=self.docker.env,
                check=False, timeout=600,
            )
            tar.stdout.close()
            tar.wait()
            if imported.returncode != 0:
                raise ContainerError(f"docker import: {imported.stderr.strip()}")
        except subprocess.CalledProcessError as exc:
            raise ContainerError(f"debootstrap failed ({exc.returncode}); see {self.log}") from exc
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        return tag

    def stack_key(self, base: str) -> tuple[str, list[str]]:
        """The stack image's input hash and the pinned Python requirements it uses."""
        pins = runtime_requirements()
        parts: list[bytes] = [base.encode(), "\n".join(pins).encode()]
        parts.extend(_tree_digest_parts(DEPLOY, REPO))
        for name in LDAP_FILES:
            parts.append((REPO / "ldap" / name).read_bytes())
        for name in SOURCE_FILES:
            parts.append((REPO / name).read_bytes())
        for top in SOURCE_DIRS:
            parts.extend(_tree_digest_parts(REPO / top, REPO))
        parts.extend(_tree_digest_parts(HARNESS, REPO))
        return _digest(parts), pins

    def stack(self, base: str | None = None) -> str:
        """``mailwarden/stack:HASH`` (also tagged ``latest``), built if missing."""
        base = base or self.base()
        key, pins = self.stack_key(base)
        tag = f"{IMAGE_REPO}/stack:{key}"
        if not self._exists(tag):
            started = time.monotonic()
            context = self.prepare_context(pins)
            try:
                done = self.docker(
                    "build", "-q", "--force-rm", "--build-arg", f"BASE={base}", "-t", tag,
                    "-f", str(context / "Containerfile"), str(context), check=False, timeout=1500,
                )
                if done.returncode != 0:
                    self._note(done.stderr)
                    raise ContainerError(f"docker build failed: {done.stderr.strip()[-3000:]}")
            finally:
                shutil.rmtree(context, ignore_errors=True)
            self._note(f"docker build {tag}: {time.monotonic() - started:.1f}s")
            self._prune(keep=tag)
        self.docker("tag", tag, f"{IMAGE_REPO}/stack:latest")
        return tag

    def _prune(self, keep: str, newest: int = 3) -> None:
        """Drop stack images older than the ``newest`` few (another run may still use those;
        an image a container uses is never removed)."""
        listed = self.docker("image", "ls", f"{IMAGE_REPO}/stack", "--format", "{{.Tag}}")
        tags = [t for t in listed.stdout.split() if t not in ("latest", "<none>")]  # newest first
        for tag in tags[newest:]:
            if f"{IMAGE_REPO}/stack:{tag}" != keep:
                self.docker("rmi", f"{IMAGE_REPO}/stack:{tag}", check=False)
        # Images left without a tag (``latest`` moved on) that no container uses.
        self.docker("image", "prune", "-f", "--filter", f"label={IMAGE_LABEL}", check=False)

    def prepare_context(self, pins: Sequence[str]) -> Path:
        """A build context: Containerfile, rootfs/, ldap/, harness/, wheels/deps and wheels/app."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        context = Path(tempfile.mkdtemp(prefix="mw-context-", dir=self.workdir))
        shutil.copy2(DEPLOY / "Containerfile", context / "Containerfile")
        shutil.copytree(DEPLOY / "rootfs", context / "rootfs", symlinks=True)
        (context / "ldap").mkdir()
        for name in LDAP_FILES:
            shutil.copy2(REPO / "ldap" / name, context / "ldap" / name)
        shutil.copytree(HARNESS, context / "harness", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        source = copy_source(context / "source")
        pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check"]
        with self.log.open("ab") as log:
            for args in ([*pip, "-w", str(context / "wheels/app"), str(source)],
                         [*pip, "-w", str(context / "wheels/deps"), *pins]):
                done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=900)
                if done.returncode != 0:
                    raise ContainerError(f"pip wheel failed ({done.returncode}); see {self.log}")
        shutil.rmtree(source)
        return context


def copy_source(dest: Path) -> Path:
    """A copy of what mailwarden's wheel (or sdist) is built from, at ``dest``: building
    from the copy leaves no build/ or egg-info behind in the checkout."""
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, dest / name)
    for top in SOURCE_DIRS:
        shutil.copytree(REPO / top, dest / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Host:
    """One container of the stack: its role (``mw-init ROLE``), fixed address and volumes."""

    name: str
    role: str
    octet: int
    hostname: str
    volumes: tuple[tuple[str, str], ...] = ()  # (volume suffix, mount point)
    ready_ports: tuple[int, ...] = ()
    # The host's log directory under the stack's; the front nodes share one, as a
    # cluster's nodes log to one place (each Postfix line names its node).
    logs: str = ""

    @property
    def log_dir(self) -> str:
        """The name of the directory the host's /var/log/mailwarden is."""
        return self.logs or self.name


MAIL_ROOT = "/srv/mail"
SAMPLE_PASSWORD = "secret"  # every subscriber's in ldap/sample.ldif
# The stack's daemons bind as the daemons' read-only account (common.toml); a command
# that changes the directory runs as the sample system administrator uid=root.
SERVICE_DN = "cn=mailwarden,ou=services,dc=mailwarden,dc=test"
ADMIN_PASSWORD_FILE = "/etc/mailwarden-stack/root.pw"
ADMIN_ENV = ("env", "MAILWARDEN_AS=root", f"MAILWARDEN_PASSWORD_FILE={ADMIN_PASSWORD_FILE}")
INTERNET_MAIL = "/srv/internet-mail"
# Records the front node publishes at start (its DKIM keys' TXT records), as *.zone
# files the dns host serves besides its zone.
PUBLISHED_ZONES = "/var/lib/mailwarden-stack/published"
# The mailbox hosts' doveadm HTTP API ([render] doveadm_http_port in mailbox.toml and
# front.toml), which `mailwarden archive` on the front node asks.
DOVEADM_PORT = 8080
# The mailbox hosts' IMAP listener for archive copies ([render] archive_imap_port).
ARCHIVE_IMAP_PORT = 1143
# What a mailbox host answers on once up: LMTP, POP3, IMAP, quota-status, doveadm HTTP,
# archive IMAP.
MAILBOX_PORTS = (24, 110, 143, 12340, DOVEADM_PORT, ARCHIVE_IMAP_PORT)

# What a front node answers on (behind the balancer, each wants the PROXY protocol
# header first): MX, submission, submissions, POP-before-SMTP, POP3, IMAP, POP3S, IMAPS.
FRONT_PORTS = (25, 587, 465, 2525, 110, 143, 995, 993)
# The web console: `mailwarden web run` on every front node ([web] listen, front.toml),
# and the balancer's HTTP frontend in front of them.
WEB_PORT = 8025
# MW_SPAM_ENGINE: the front nodes score spam with spamd (the default) or rspamd.
SPAM_ENGINES = ("spamd", "rspamd")
RSPAMD_PORT = 11333
BALANCER_WEB_PORT = 80
FRONT_VOLUMES = (("published", PUBLISHED_ZONES), ("mail", MAIL_ROOT))
SENTINEL_PORT = 26379
# The daemons' /metrics on a front node ([milter] / [policyd] metrics_listen, front.toml).
METRICS_PORTS = {"milter": 9101, "policyd": 9102}
PROMETHEUS_PORT = 9090


def front_node(name: str, octet: int, hostname: str) -> Host:
    """One more front node: every one is the same but for its name and address."""
    return Host(name, "front", octet, hostname, FRONT_VOLUMES, (*FRONT_PORTS, WEB_PORT), logs="front")


# In start order: what a host needs is up before it starts.  The two mailbox hosts
# share one Maildir volume, as mailbox hosts share an NFS export in production; the
# front nodes keep their quarantine and DKIM keys there.  Three Sentinels (on redis,
# redis2 and dns) watch the Redis primary; the balancer (HAProxy) is the MX and the
# address clients use, and passes their connections round robin to the front nodes.
TOPOLOGY: tuple[Host, ...] = (
    Host("dns", "dns", 53, "dns.mailwarden.test", (("published", PUBLISHED_ZONES),), (SENTINEL_PORT,)),
    Host("ldap", "ldap", 30, "ldap.mailwarden.test", ready_ports=(389,)),
    Host("ldap2", "ldap-consumer", 32, "ldap2.mailwarden.test", ready_ports=(389,)),
    Host("redis", "redis", 31, "redis.mailwarden.test", ready_ports=(6379, SENTINEL_PORT)),
    Host("redis2", "redis-replica", 33, "redis2.mailwarden.test", ready_ports=(6379, SENTINEL_PORT)),
    Host("mbox1", "mailbox", 21, "mbox1.example.jp", (("mail", MAIL_ROOT),), MAILBOX_PORTS),
    Host("mbox2", "mailbox", 22, "mbox2.example.jp", (("mail", MAIL_ROOT),), MAILBOX_PORTS),
    front_node("front", 10, "mx1.mailwarden.test"),
    front_node("front2", 11, "mx2.mailwarden.test"),
    Host("balancer", "balancer", 5, "mx.mailwarden.test", ready_ports=(*FRONT_PORTS, BALANCER_WEB_PORT)),
    Host("prometheus", "prometheus", 40, "prometheus.mailwarden.test", ready_ports=(PROMETHEUS_PORT,)),
    Host("internet", "internet", 100, "mx.outside.test", (("internet-mail", INTERNET_MAIL),), (25,)),
    # A legacy mail system a domain is migrated from (tests/containers/test_migration.py).
    Host("legacy", "legacy", 41, "mail.oldisp.test", (), (25, 110, 143, 24)),
)
# Not started with the stack: the node a test adds to the balancer under load.
SPARE_FRONT = front_node("front3", 12, "mx3.mailwarden.test")
HOSTS = {h.name: h for h in (*TOPOLOGY, SPARE_FRONT)}
# The hosts that stop last (the mail hosts use them).
INFRASTRUCTURE = ("ldap", "ldap2", "redis", "redis2", "dns")
# Front-node Postfix instances, as `mailwarden render postfix` names them.
FRONT_INSTANCES = ("mx", "submission", "pop-before-smtp", "route", "mailbox")


def _routes() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _run_quiet("ip", "-4", "route", "show").splitlines():
        first = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if first != "default":
                nets.append(ipaddress.IPv4Network(first, strict=False))
    return nets


def pick_network(preferred: str | None = None) -> str:
    """The first three octets of a /24 that no route on this machine overlaps."""
    candidates = [preferred] if preferred else [f"10.231.{n}" for n in range(7, 64)]
    used = _routes()
    for prefix in candidates:
        net = ipaddress.IPv4Network(f"{prefix}.0/24")
        if not any(net.overlaps(u) for u in used):
            return prefix
    raise ContainerError(f"no free /24 among {candidates[0]}...{candidates[-1]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unverified_tls() -> ssl.SSLContext:
    # The stack's services present Debian's self-signed snakeoil certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class MailStack:
    """The containers of one run: network, volumes, hosts, and helpers to drive them.

    ``owner`` is the PID whose exit makes the stack an orphan (the test session);
    the demo passes ``owner=0``, as its stack outlives the command that starts it.
    """

    def __init__(
        self, docker: Docker, image: str, workdir: Path, *, net: str | None = None,
        owner: int | None = None, name: str | None = None, spam_engine: str | None = None,
    ) -> None:
        self.docker = docker
        # What the front nodes' milter scores spam with (mw-init's MW_SPAM_ENGINE).
        self.spam_engine = spam_engine or os.environ.get("MW_SPAM_ENGINE") or "spamd"
        if self.spam_engine not in SPAM_ENGINES:
            raise ContainerError(f"MW_SPAM_ENGINE={self.spam_engine!r}: one of {', '.join(SPAM_ENGINES)}")
        self.image = image
        self.workdir = workdir
        self.net = net or pick_network(os.environ.get("MAILWARDEN_CONTAINER_NET"))
        self.owner = os.getpid() if owner is None else owner
        self.name = name or f"mw{secrets.token_hex(3)}"
        self.network = f"{self.name}-net"
        self.logdir = workdir / "logs"
        self.started: list[str] = []
        self._bridge: str | None = None
        self._init_mark: dict[str, int] = {}

    @classmethod
    def attach(cls, docker: Docker, name: str) -> MailStack:
        """A stack that is already running (the demo's, ``mwdemo``), to drive or inspect it."""
        networks = _labelled(docker, "network", f"{LABEL}={name}")
        if not networks:
            raise ContainerError(f"no running stack named {name!r} (docker network ls)")
        subnet = docker("network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
                        networks[0]).stdout.strip()
        front = f"{name}-front"
        image = docker("inspect", "-f", "{{.Config.Image}}", front).stdout.strip()
        logs = docker("inspect", "-f", '{{range .Mounts}}{{if eq .Destination "/var/log/mailwarden"}}'
                      "{{.Source}}{{end}}{{end}}", front).stdout.strip()
        env = docker("inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", front).stdout.split()
        engine = next((e.split("=", 1)[1] for e in env if e.startswith("MW_SPAM_ENGINE=")), "spamd")
        stack = cls(docker, image, Path(logs).parents[1], net=subnet.rsplit(".", 1)[0], owner=0, name=name,
                    spam_engine=engine)
        stack.started = [h.name for h in TOPOLOGY]
        return stack

    @property
    def fronts(self) -> list[str]:
        """The front nodes running now."""
        return [h for h in self.started if HOSTS[h].role == "front"]

    # ---------------------------------------------------------------- names and addresses
    def ip(self, host: str) -> str:
        """The fixed address of ``host`` (``front``, ``mbox1``, ...)."""
        return f"{self.net}.{HOSTS[host].octet}"

    @property
    def gateway(self) -> str:
        """This machine's own address on the stack's network."""
        return f"{self.net}.1"

    def container(self, host: str) -> str:
        """The container name of ``host``."""
        return f"{self.name}-{host}"

    def volume(self, suffix: str) -> str:
        """The Docker volume name for ``suffix`` (``mail``, ``internet-mail``)."""
        return f"{self.name}-{suffix}"

    # ---------------------------------------------------------------- lifecycle
    def up(self, hosts: Sequence[Host] = TOPOLOGY, timeout: float = 120.0) -> MailStack:
        """Create the network and volumes, start ``hosts`` in order, wait until each answers."""
        remove_orphans(self.docker)
        labels = ["--label", f"{LABEL}={self.name}", "--label", f"{OWNER_LABEL}={self.owner}"]
        self.docker("network", "create", "--internal", "--subnet", f"{self.net}.0/24",
                    "--gateway", self.gateway, *labels, self.network)
        for suffix in sorted({v for h in hosts for v, _ in h.volumes}):
            self.docker("volume", "create", *labels, self.volume(suffix))
        for host in hosts:
            self._run(host, labels)
        deadline = time.monotonic() + timeout
        for host in hosts:
            self.wait_ready(host.name, deadline)
        return self

    def add(self, host: Host, timeout: float = 120.0) -> None:
        """Start one more host (a further front node) on the running stack's network."""
        labels = ["--label", f"{LABEL}={self.name}", "--label", f"{OWNER_LABEL}={self.owner}"]
        self._run(host, labels)
        self.wait_ready(host.name, time.monotonic() + timeout)

    def remove(self, host: str, timeout: float = 60.0) -> None:
        """Stop and remove a front node taken out of the balancer, once its queues are empty
        (what it accepted is delivered first, as when a node leaves for maintenance)."""
        deadline = time.monotonic() + timeout
        while any(self.queue(host, inst) for inst in FRONT_INSTANCES) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.docker("stop", "-t", "20", self.container(host), check=False, timeout=60)
        self.docker("rm", "-f", "-v", self.container(host), check=False)
        self.started.remove(host)

    def _run(self, host: Host, labels: list[str]) -> None:
        logs = self.logdir / host.log_dir
        logs.mkdir(parents=True, exist_ok=True)
        args = [
            "run", "-d", "--init", "--name", self.container(host.name), *labels,
            "--hostname", host.hostname, "--network", self.network, "--ip", self.ip(host.name),
            "--network-alias", host.name, "--network-alias", host.hostname,
            "--dns", self.ip("dns"), "--env", f"MW_NET={self.net}",
            "--env", f"MW_SPAM_ENGINE={self.spam_engine}",
            "--volume", f"{logs}:/var/log/mailwarden", "--stop-timeout", "20",
        ]
        for suffix, mountpoint in host.volumes:
            args += ["--volume", f"{self.volume(suffix)}:{mountpoint}"]
        self._init_mark[host.name] = self.log_size(host.name, "init")
        self.docker(*args, self.image, host.role)
        self.started.append(host.name)

    def stop(self, host: str, timeout: int = 20) -> None:
        """Stop ``host``'s container as an operator would (its daemons stopped by mw-init)."""
        self.docker("stop", "-t", str(timeout), self.container(host), timeout=timeout + 60)

    def start(self, host: str, timeout: float = 120.0) -> None:
        """Start a stopped host again (mw-init runs again) and wait until it answers."""
        self._init_mark[host] = self.log_size(host, "init")
        self.docker("start", self.container(host), timeout=60)
        self.wait_ready(host, time.monotonic() + timeout)

    def wait_ready(self, host: str, deadline: float) -> None:
        """Wait until ``host``'s ports answer; raise with its logs if it does not."""
        for port in HOSTS[host].ready_ports:
            while not _tcp_answers(self.ip(host), port):
                self._give_up_if(host, deadline, f"port {port}")
                time.sleep(0.2)
        if HOSTS[host].role == "dns":
            while not _dns_answers(self.ip(host)):
                self._give_up_if(host, deadline, "DNS")
                time.sleep(0.2)
        if HOSTS[host].role == "balancer":
            # HAProxy listens at once; a node is in service after its health checks pass.
            while not self._all_in_service():
                self._give_up_if(host, deadline, "the front nodes' health checks")
                time.sleep(0.5)

    def _all_in_service(self) -> bool:
        servers = self.balancer_servers()
        return bool(servers) and all(status == "UP" for status in servers.values())

    def answers(self, host: str, port: int) -> bool:
        """Whether ``host`` accepts a TCP connection on ``port`` now."""
        return _tcp_answers(self.ip(host), port)

    def _give_up_if(self, host: str, deadline: float, what: str) -> None:
        state = self.docker("inspect", "-f", "{{.State.Status}}", self.container(host), check=False)
        # Only what this start logged: the front nodes share one init.log, and a host
        # started again has the lines of its earlier run.
        died = " exited (status" in self.log(host, "init")[self._init_mark.get(host, 0):]
        if died or time.monotonic() > deadline or state.stdout.strip() not in ("running", "created"):
            why = "a daemon exited" if died else f"container {state.stdout.strip() or 'gone'}"
            raise ContainerError(f"{host}: {what} did not answer ({why})\n" + self.log_tails(host))

    def down(self) -> None:
        """Remove the containers, volumes and network of this stack (idempotent)."""
        remove_stack(self.docker, self.name)
        self.started = []

    # ---------------------------------------------------------------- inside the hosts
    def exec(
        self, host: str, *cmd: str, input: str | None = None, check: bool = True, timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``host`` (the only safe way to drive its Postfix)."""
        args = ["exec", *(["-i"] if input is not None else []), self.container(host), *cmd]
        return self.docker(*args, input=input, check=check, timeout=timeout)

    def read_file(self, host: str, path: str) -> str:
        """The text of a file inside ``host``."""
        return self.exec(host, "cat", path).stdout

    def mailwarden(
        self, *args: str, check: bool = True, admin: bool = False, host: str = "front", timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """The ``mailwarden`` command on a front node (its config, its LDAP, its store),
        bound as the daemons' account, or with ``admin`` as the system administrator
        ``root`` (what a command that changes the directory needs)."""
        prefix = ADMIN_ENV if admin else ()
        return self.exec(host, *prefix, "mailwarden", *args, check=check, timeout=timeout)

    def swaks(
        self, host: str, *args: str, input_text: str | None = None, timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """swaks inside ``host`` (``--data -`` reads ``input_text``); exit status 0 = sent,
        23/24/25/26 = refused at MAIL / every RCPT / DATA / after the final dot."""
        return self.exec(host, "swaks", "--timeout", "30", *args, input=input_text, check=False,
                         timeout=timeout)

    def forget_reputation(self) -> None:
        """Drop every IP reputation score from the shared store.

        The Internet host stands for every sender on the Internet, so the viruses and
        spam one scenario sends would otherwise make the next one's clean mail wait."""
        self.redis_cli("sh", "-c", "redis-cli -h $PRIMARY --scan --pattern 'mw:rep:*'"
                       " | xargs -r redis-cli -h $PRIMARY del")

    def primary(self) -> str:
        """The Redis primary's address, as the Sentinels name it now."""
        done = self.exec("dns", "redis-cli", "-p", str(SENTINEL_PORT), "sentinel", "get-master-addr-by-name",
                         "mymaster")
        return done.stdout.split()[0]

    def redis_cli(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """``cmd`` on the dns host with PRIMARY set to the current Redis primary's address."""
        return self.exec("dns", "env", f"PRIMARY={self.primary()}", *cmd)

    # ---------------------------------------------------------------- the cluster
    def balancer(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``mw-balancer ARGS`` on the balancer (``add NAME ADDRESS WEIGHT``, ``remove NAME``)."""
        return self.exec("balancer", "mw-balancer", *args)

    def balancer_servers(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> HAProxy's status of it (``UP``, ``DOWN``, ...), from its stats socket."""
        done = self.exec("balancer", "python3", "-c", _SHOW_STAT)
        servers = {}
        for line in done.stdout.splitlines()[1:]:
            fields = line.split(",")
            if len(fields) > 17 and fields[1] not in ("FRONTEND", "BACKEND"):
                servers[(fields[0], fields[1])] = fields[17]
        return servers

    def landed(self, frontend: str, source: str, *, after: int = 0) -> list[str]:
        """The front nodes the balancer passed ``source``'s connections to on ``frontend``
        (``smtp``, ``submission``, ``pbs``, ``pop3``, ...), in the order they ended;
        every client's if ``source`` is empty."""
        client = re.escape(source) if source else r"[\d.]+"
        pattern = re.compile(rf"^{client}:\d+ \[[^\]]+\] {frontend} {frontend}/(\w+) ",
                             re.MULTILINE)
        return pattern.findall(self.log("balancer", "haproxy"), after)

    def metrics(self, host: str, daemon: str) -> Samples:
        """One scrape of ``daemon``'s (``milter``, ``policyd``) /metrics on front node ``host``."""
        return scrape(f"http://{self.ip(host)}:{METRICS_PORTS[daemon]}/metrics")

    def prometheus(self, query: str) -> list[dict[str, object]]:
        """The result vector of an instant PromQL ``query`` through Prometheus's HTTP API."""
        url = f"http://{self.ip('prometheus')}:{PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode(
            {"query": query})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        if answer.get("status") != "success":
            raise ContainerError(f"prometheus {query!r}: {answer}")
        result: list[dict[str, object]] = answer["data"]["result"]
        return result

    def settings(self) -> dict[str, str]:
        """The cluster's timing (``cluster.env``: Sentinel's and the balancer's settings)."""
        text = self.read_file("balancer", "/etc/mailwarden-stack/cluster.env")
        return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))

    # ---------------------------------------------------------------- logs and queues
    def log(self, host: str, name: str = "postfix") -> str:
        """The text of ``/var/log/mailwarden/NAME.log`` of ``host`` ('' if absent); the
        front nodes share theirs."""
        path = self.logdir / HOSTS[host].log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_size(self, host: str, name: str = "postfix") -> int:
        """The current length of a log: pass it as ``after=`` to look only at what follows."""
        return len(self.log(host, name))

    def log_tails(self, *hosts: str, lines: int = 40) -> str:
        """The last lines of every log of ``hosts`` (all started hosts if none)."""
        out = []
        for host in dict.fromkeys(HOSTS[h].log_dir for h in (hosts or self.started)):
            for path in sorted((self.logdir / host).glob("*.log")):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"==> {host}/{path.name} <==\n" + "\n".join(tail))
        return "\n".join(out)

    def wait_for_log(
        self, host: str, pattern: str, name: str = "postfix", *, after: int = 0, timeout: float = 30.0,
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex, multi-line) appears in a log past offset ``after``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log(host, name), after)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{host}/{name}.log: no /{pattern}/ within {timeout:g}s\n"
                                     + self.log_tails(host))
            time.sleep(0.2)

    def queue(self, host: str, instance: str = "") -> list[dict[str, object]]:
        """``postqueue -j`` of ``host``'s Postfix (``instance``: a front-node role, e.g. ``mx``)."""
        config = f"/etc/postfix-{instance}" if instance else "/etc/postfix"
        done = self.exec(host, "postqueue", "-c", config, "-j")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def front_queue(self) -> list[dict[str, object]]:
        """Every message queued in any Postfix instance of any front node."""
        return [entry for node in self.fronts for inst in FRONT_INSTANCES for entry in self.queue(node, inst)]

    def wait_queues_empty(self, timeout: float = 30.0) -> None:
        """Wait until no Postfix of the stack holds a message."""
        deadline = time.monotonic() + timeout
        while True:
            queued = self.front_queue() + [q for h in ("mbox1", "mbox2", "internet") for q in self.queue(h)]
            if not queued:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"queues not empty after {timeout:g}s: {queued}\n"
                                     + self.log_tails("front", lines=20))
            time.sleep(0.3)

    # ---------------------------------------------------------------- mailboxes
    def volume_path(self, suffix: str) -> Path:
        """Where a volume's files are on this machine (Docker's local driver)."""
        done = self.docker("volume", "inspect", "-f", "{{.Mountpoint}}", self.volume(suffix))
        return Path(done.stdout.strip())

    def maildir(self, address: str, folder: str = "") -> Path:
        """A subscriber's Maildir folder on the shared volume ('' INBOX, 'Junk' .Junk)."""
        local, domain = address.lower().split("@")
        base = self.volume_path("mail") / domain / local / "Maildir"
        return base / f".{folder}" if folder else base

    def internet_maildir(self) -> Path:
        """The Maildir holding all mail the Internet host received for ``@outside.test``."""
        return self.volume_path("internet-mail") / "outside.test"

    def wait_for_messages(
        self, maildir: Path, count: int = 1, *, timeout: float = 30.0, match: str = "",
        delivered_to: str = "",
    ) -> list[EmailMessage]:
        """Wait until ``maildir`` holds ``count`` messages containing ``match`` (and, if
        given, delivered to ``delivered_to``); return them, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in read_maildir(maildir) if match in message_text(m)
                     and (not delivered_to or delivered_to.lower() in
                          [v.lower() for v in m.get_all("Delivered-To", [])])]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{maildir}: {len(found)} of {count} messages after {timeout:g}s\n"
                                     + self.log_tails("front", "mbox1", "mbox2", "internet", lines=25))
            time.sleep(0.3)

    # ---------------------------------------------------------------- clients on this machine
    def client_address(self, n: int) -> str:
        """A further address of this machine on the stack's network (``NET.200+n``), so
        tests can be different clients: a roaming subscriber, a third party, ..."""
        address = f"{self.net}.{200 + n}"
        if self._bridge is None:
            net_id = self.docker("network", "inspect", "-f", "{{.Id}}", self.network).stdout.strip()
            self._bridge = f"br-{net_id[:12]}"
        if address not in _run_quiet("ip", "-4", "addr", "show", "dev", self._bridge):
            subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", self._bridge],
                           check=True, capture_output=True)
        return address

    def send(
        self, host: str, port: int, sender: str, recipients: Sequence[str],
        message: bytes | EmailMessage | None = None, *, source: str | None = None,
        login: tuple[str, str] | None = None, starttls: bool = False, helo: str = "client.outside.test",
    ) -> SmtpResult:
        """One SMTP transaction from this machine (from ``source``) recording every reply."""
        result = SmtpResult()
        if message is None:
            message = make_message(sender, recipients)
        data = message.as_bytes() if isinstance(message, EmailMessage) else message
        try:
            smtp = smtplib.SMTP(self.ip(host), port, local_hostname=helo, timeout=60,
                                source_address=(source or self.gateway, 0))
        except smtplib.SMTPConnectError as exc:
            result.connect = (exc.smtp_code, str(exc.smtp_error))
            return result
        result.connect = (220, "")
        with smtp:
            smtp.ehlo()
            if starttls:
                smtp.starttls(context=_unverified_tls())
                smtp.ehlo()
            if login is not None:
                try:
                    smtp.login(*login)
                    result.auth = (235, "2.7.0 Authentication successful")
                except smtplib.SMTPAuthenticationError as exc:
                    error = exc.smtp_error
                    result.auth = (exc.smtp_code, error.decode(errors="replace") if isinstance(error, bytes)
                                   else error)
                    return result
            code, text = smtp.mail(sender)
            result.mail = (code, text.decode(errors="replace"))
            if code != 250:
                return result
            for rcpt in recipients:
                code, text = smtp.rcpt(rcpt)
                result.rcpt[rcpt] = (code, text.decode(errors="replace"))
            if any(code == 250 for code, _ in result.rcpt.values()):
                code, text = smtp.data(data)
                result.data = (code, text.decode(errors="replace"))
            else:
                smtp.rset()
        return result

    def pop3(self, user: str, password: str = SAMPLE_PASSWORD, *, host: str = "balancer",
             source: str | None = None) -> poplib.POP3:
        """A POP3 session after STARTTLS and login (through the balancer to a front node's
        proxy by default)."""
        client = _POP3From(self.ip(host), source or self.gateway)
        client.stls(_unverified_tls())
        client.user(user)
        client.pass_(password)
        return client

    def imap(self, user: str, password: str = SAMPLE_PASSWORD, *, host: str = "balancer") -> imaplib.IMAP4:
        """An IMAP session after STARTTLS and login (through the balancer to a front node's
        proxy by default)."""
        client = imaplib.IMAP4(self.ip(host), 143, timeout=30)
        client.starttls(_unverified_tls())
        client.login(user, password)
        return client


# Run on the balancer: HAProxy's "show stat" CSV from its stats socket (the image has
# no socat; its Python is Debian's).
_SHOW_STAT = """
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/haproxy.sock")
s.sendall(b"show stat\\n")
out = b""
while chunk := s.recv(65536):
    out += chunk
print(out.decode())
"""


class _POP3From(poplib.POP3):
    """poplib.POP3 from a chosen source address (POP-before-SMTP keys on the client IP)."""

    def __init__(self, host: str, source: str) -> None:
        self._source = source
        super().__init__(host, 110, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source, 0))


def read_maildir(maildir: Path) -> list[EmailMessage]:
    """The messages in a Maildir folder (new/ and cur/), oldest first."""
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()]
    files.sort(key=lambda p: (p.stat().st_mtime, p.name))
    out = []
    for path in files:
        with contextlib.suppress(FileNotFoundError):  # Dovecot may move new/ -> cur/ meanwhile
            out.append(message_from_bytes(path.read_bytes(), policy=email.policy.default))
    return [m for m in out if isinstance(m, EmailMessage)]


def message_text(message: EmailMessage) -> str:
    """Headers and decoded text parts of a message (what a reader would see)."""
    parts = [f"{name}: {value}" for name, value in message.items()]
    for part in message.walk():
        if part.get_content_maintype() == "text" and isinstance(part, EmailMessage):
            with contextlib.suppress(LookupError, ValueError):
                parts.append(str(part.get_content()))
    return "\n".join(parts)


def _tcp_answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return True
    except OSError:
        return False


def _dns_answers(ip: str) -> bool:
    import dns.exception
    import dns.message
    import dns.query

    try:
        dns.query.udp(dns.message.make_query("outside.test", "TXT"), ip, timeout=1.0)
    except (OSError, dns.exception.DNSException):
        return False
    return True


def _labelled(docker: Docker, kind: str, label: str) -> list[str]:
    if kind == "container":
        args = ["ps", "-a", "--filter", f"label={label}", "--format", "{{.ID}}"]
    else:
        args = [kind, "ls", "--filter", f"label={label}", "--format",
                "{{.Name}}" if kind == "volume" else "{{.ID}}"]
    return docker(*args, check=False).stdout.split()


def remove_stack(docker: Docker, name: str) -> None:
    """Remove every container, then the volumes and network labelled ``LABEL=name``."""
    label = f"{LABEL}={name}"
    containers = _labelled(docker, "container", label)
    if containers:
        # Graceful first (mw-init stops Postfix from inside its own pid namespace), the
        # mail hosts before the directory, store and DNS they use.
        names = {c: docker("inspect", "-f", "{{.Name}}", c, check=False).stdout.strip() for c in containers}
        infra = [c for c, n in names.items() if n.rsplit("-", 1)[-1] in INFRASTRUCTURE]
        for batch in ([c for c in containers if c not in infra], infra):
            if batch:
                docker("stop", "-t", "15", *batch, check=False, timeout=120)
        docker("rm", "-f", "-v", *containers, check=False, timeout=120)
    for volume in _labelled(docker, "volume", label):
        docker("volume", "rm", "-f", volume, check=False)
    for network in _labelled(docker, "network", label):
        docker("network", "rm", network, check=False)


def stacks(docker: Docker) -> dict[str, int]:
    """Every stack on this Docker daemon: name -> owner PID (0: kept on purpose, the demo)."""
    found: dict[str, int] = {}
    fmt = f'{{{{.Label "{LABEL}"}}}} {{{{.Label "{OWNER_LABEL}"}}}}'
    for kind in ("ps -a", "network ls", "volume ls"):
        listed = docker(*kind.split(), "--filter", f"label={LABEL}", "--format", fmt, check=False).stdout
        for line in listed.splitlines():
            name, _, owner = line.partition(" ")
            if name:
                found[name] = int(owner) if owner.isdigit() else 0
    return found


def remove_orphans(docker: Docker) -> list[str]:
    """Remove stacks whose owner process is gone (a run killed before its teardown)."""
    orphans = sorted(n for n, owner in stacks(docker).items() if owner and not _pid_alive(owner))
    for name in orphans:
        remove_stack(docker, name)
    return orphans


# --------------------------------------------------------------------------- one run


class StackRun:
    """Docker (started if needed), the images, and one stack; :meth:`close` undoes all of it.

    ``close`` also runs at interpreter exit, so an interrupted run leaves nothing behind.
    """

    def __init__(self, workdir: Path, *, owner: int | None = None, name: str | None = None,
                 net: str | None = None) -> None:
        self.workdir = workdir
        self.docker = Docker(workdir / "docker")
        self.owner = owner
        self.name = name
        self.net = net
        self.stack: MailStack | None = None
        self.timings: dict[str, float] = {}
        atexit.register(self.close)

    def start(self) -> MailStack:
        """Bring everything up; return the running stack."""
        started = time.monotonic()
        self.docker.ensure_running()
        self.timings["dockerd"] = time.monotonic() - started
        images = Images(self.docker, self.workdir / "build")
        mark = time.monotonic()
        image = images.stack()
        self.timings["images"] = time.monotonic() - mark
        mark = time.monotonic()
        self.stack = MailStack(self.docker, image, self.workdir / "stack", owner=self.owner,
                               name=self.name, net=self.net)
        self.stack.up()
        self.timings["up"] = time.monotonic() - mark
        return self.stack

    def close(self) -> None:
        """Remove the stack, and stop dockerd if this run started it (idempotent)."""
        try:
            if self.stack is not None and self.docker.answers():
                self.stack.down()
        finally:
            self.stack = None
            self.docker.stop()
            atexit.unregister(self.close)


# --------------------------------------------------------------------------- compose


COMPOSE_NET = "${MW_NET:-10.231.7}"
COMPOSE_FILE = DEPLOY / "compose.yaml"


def compose_file(image: str = f"{IMAGE_REPO}/stack:latest") -> str:
    """``deploy/container/compose.yaml``: the hosts, addresses and volumes of :data:`TOPOLOGY`,
    for Docker Compose (a test keeps the shipped file equal to this)."""
    net = COMPOSE_NET
    lines = [
        "# The mailwarden topology for Docker Compose: the same hosts, addresses and volumes",
        "# as the container test suite (generated by `python -m harness.containers",
        "# compose`; tests/containers keeps the two equal).  Build the image first:",
        "#   scripts/container-build.sh        (tags mailwarden/stack:latest)",
        "#   docker-compose -f deploy/container/compose.yaml -p mailwarden up -d",
        "# The network is internal: the hosts reach each other only, and this machine reaches",
        f"# them at their addresses, e.g. swaks --server {net}.{HOSTS['front'].octet} (front node).",
        "# MW_NET (default 10.231.7) picks another /24.  See docs/containers.md.",
        "services:",
    ]
    before: list[str] = []
    for host in TOPOLOGY:
        lines += [
            f"  {host.name}:",
            f"    image: {image}",
            f"    command: [{host.role}]",
            "    init: true",
            f"    hostname: {host.hostname}",
            "    environment:",
            f"      MW_NET: \"{net}\"",
            "      MW_SPAM_ENGINE: \"${MW_SPAM_ENGINE:-spamd}\"",
            f"    dns: [\"{net}.{HOSTS['dns'].octet}\"]",
            "    stop_grace_period: 20s",
            "    networks:",
            "      mailwarden:",
            f"        ipv4_address: \"{net}.{host.octet}\"",
            f"        aliases: [{host.name}, {host.hostname}]",
        ]
        if host.volumes:
            lines.append("    volumes:")
            lines += [f"      - {suffix}:{mountpoint}" for suffix, mountpoint in host.volumes]
        if before:
            lines.append(f"    depends_on: [{', '.join(before)}]")
        before.append(host.name)
    lines += [
        "networks:",
        "  mailwarden:",
        "    internal: true",
        "    ipam:",
        "      config:",
        f"        - subnet: \"{net}.0/24\"",
        f"          gateway: \"{net}.1\"",
        "volumes:",
        *[f"  {suffix}: {{}}" for suffix in sorted({v for h in TOPOLOGY for v, _ in h.volumes})],
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- DNS stub


_TXT_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def read_zone(text: str) -> dict[str, dict[str, list[str]]]:
    """``NAME [IN] TYPE VALUE`` lines (``;`` starts a comment line) as :class:`StubDns` records.

    Names are compared without case or the final dot.  A TXT character string longer
    than DNS allows (255) is cut into several, as a DKIM key's record must be: the line
    ``mailwarden dkim keygen`` prints can be added as it is.
    """
    records: dict[str, dict[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        name, rest = line.split(None, 1)
        if rest.split(None, 1)[0].upper() == "IN":
            rest = rest.split(None, 1)[1]
        rtype, value = rest.split(None, 1)
        value = value.strip()
        if rtype.upper() == "TXT" and _TXT_STRING.search(value):
            value = " ".join(f'"{s[i:i + 255]}"' for s in _TXT_STRING.findall(value)
                             for i in range(0, max(len(s), 1), 255))
        records.setdefault(name.rstrip(".").lower(), {}).setdefault(rtype.upper(), []).append(value)
    return records


class ZoneFiles:
    """The stack's zone file plus every ``*.zone`` file in a directory (records the hosts
    publish while the stack runs: the front node's DKIM keys), read again when any changes."""

    def __init__(self, zone: Path, published: Path | None = None) -> None:
        self.zone = zone
        self.published = published
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._records: dict[str, dict[str, list[str]]] = {}

    def files(self) -> list[Path]:
        """The zone file, then the published ones in name order."""
        extra = sorted(self.published.glob("*.zone")) if self.published and self.published.is_dir() else []
        return [self.zone, *extra]

    def records(self) -> dict[str, dict[str, list[str]]]:
        """All records, the files read again if one was added, removed or changed."""
        stats = []
        for path in self.files():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                stats.append((str(path), st.st_mtime_ns, st.st_size))
        if tuple(stats) != self._seen:
            text = "\n".join(Path(p).read_text(encoding="utf-8") for p, _, _ in stats)
            self._records, self._seen = read_zone(text), tuple(stats)
        return self._records


class _ZoneStub(StubDns):
    """A StubDns whose records are the zone files' current ones."""

    def __init__(self, zones: ZoneFiles, port: int) -> None:
        super().__init__(zones.records(), port=port)
        self.zones = zones
        self._lock = threading.Lock()

    def answer(self, wire: bytes) -> bytes | None:
        with self._lock:
            self.records = self.zones.records()
            self.queries.clear()  # a long-running server keeps no query log
        return super().answer(wire)


def dns_servers(
    records: dict[str, dict[str, list[str]]] | ZoneFiles, listen: str, port: int,
) -> tuple[socketserver.BaseServer, socketserver.BaseServer]:
    """UDP and TCP servers answering from ``records`` (not yet serving), as StubDns does
    on loopback, but on any address: inside the dns container they serve the network."""
    stub = _ZoneStub(records, port) if isinstance(records, ZoneFiles) else StubDns(records, port=port)
    return stub.servers(listen)


def serve_dns(zones: ZoneFiles, listen: str, port: int) -> None:
    """Answer DNS on ``listen:port`` (UDP and TCP) from the zone files, until killed."""
    udp, tcp = dns_servers(zones, listen, port)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    count = sum(len(values) for rrs in zones.records().values() for values in rrs.values())
    print(f"dns stub: {count} records on {listen}:{port}"
          + (f", and those published in {zones.published}" if zones.published else ""), flush=True)
    udp.serve_forever()


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.containers build|serve-dns|cleanup|compose``."""
    parser = argparse.ArgumentParser(prog="python -m harness.containers")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build (or reuse) the base and stack images; print the tag")
    build_cmd.add_argument("--base", help="a Debian 12 image to build on (default: debootstrap + import)")
    dns_cmd = sub.add_parser("serve-dns", help="the stack's stub DNS (run inside the dns container)")
    dns_cmd.add_argument("--zone", type=Path, required=True)
    dns_cmd.add_argument("--published", type=Path, help="a directory of further *.zone files, "
                         "read again when they change")
    dns_cmd.add_argument("--listen", default="127.0.0.1")
    dns_cmd.add_argument("--port", type=int, default=53)
    sub.add_parser("cleanup", help="remove stacks whose owner process is gone")
    sub.add_parser("compose", help="print deploy/container/compose.yaml")
    args = parser.parse_args(argv)
    if args.command == "serve-dns":
        serve_dns(ZoneFiles(args.zone, args.published), args.listen, args.port)
        return 0
    if args.command == "compose":
        sys.stdout.write(compose_file())
        return 0
    docker = Docker(CACHE / "docker")
    if args.command == "build":
        docker.ensure_running()
        try:
            print(Images(docker, CACHE / "build").stack(args.base))
        finally:
            docker.stop()
        return 0
    if not docker.answers():
        print("no Docker daemon answers: nothing to clean up")
        return 0
    print("removed: " + (", ".join(remove_orphans(docker)) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
