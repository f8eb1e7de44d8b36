"""Two front nodes, one quarantine: what node A quarantined, node B lists, shows and releases.

Each node is a real Postfix MX with its own milter process (own spool directory and
node name); the nodes share the quarantine directory (the NAS) and a real Redis (the
shared store), and both relay to one mailbox host (an SMTP sink).  Real clamd, real slapd.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.clamd import EICAR, ClamdServer
from harness.postfix import PostfixInstance, missing_postfix
from harness.redisserver import RedisServer
from harness.slapd import SlapdServer, mailwarden_database
from harness.smtpsink import SmtpSink
from tests.milter.conftest import REINJECT_OPTIONS, MilterProcess, base_sections
from tests.milter.test_cli import run

pytestmark = [pytest.mark.e2e, pytest.mark.slapd, pytest.mark.redis,
              pytest.mark.skipif(missing_postfix() is not None, reason=str(missing_postfix()))]

HELD = "held@bare.example.net"  # virus_action = quarantine


@dataclass
class FrontNode:
    name: str
    milter: MilterProcess
    mx: PostfixInstance

    def quarantine(self, subject: str) -> str:
        """Send an infected message through this node; the id it was quarantined under."""
        msg = EmailMessage()
        msg["From"] = "someone@remote.example"
        msg["To"] = HELD
        msg["Subject"] = subject
        msg.set_content(EICAR.decode() + "\n")
        since = len(self.milter.log())
        assert self.mx.send("someone@remote.example", [HELD], msg).accepted
        line = self.milter.wait_for_log("quarantine=", since=since)
        found = re.search(r"quarantine=(\S+)", line)
        assert found, line
        return found.group(1)

    def cli(self, *args: str) -> tuple[int, str]:
        """``mailwarden quarantine ...`` with this node's configuration."""
        return run(self.milter.config_path, "quarantine", *args)


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    server = SlapdServer([mailwarden_database(Path(__file__).parent / "data" / "quarantine.ldif")]).start()
    yield server
    server.cleanup()


@pytest.fixture
def nodes(directory: SlapdServer, clamd: ClamdServer, redis_server: RedisServer
          ) -> Iterator[tuple[FrontNode, FrontNode, SmtpSink, Path]]:
    work = Path(tempfile.mkdtemp(prefix="mw-quarantine-nodes-"))
    work.chmod(0o755)  # Postfix's smtpd (user postfix) connects to the milter sockets here
    nas = work / "nas" / "quarantine"
    store = f'backend = "redis"\nredis_url = "{redis_server.url}"\nkey_prefix = "q{secrets.token_hex(4)}:"\n'
    started: list[FrontNode] = []
    with SmtpSink() as mailbox:
        try:
            for name in ("mx-a", "mx-b"):
                milter = MilterProcess(work / name, base_sections(ldap_uri=directory.uri, store=store), "",
                                       node_name=name, quarantine_dir=nas)
                mx = PostfixInstance(main_cf={
                    "relay_domains": "bare.example.net", "relayhost": mailbox.relayhost,
                    "smtpd_milters": f"unix:{milter.socket_path}", "milter_protocol": "6",
                    "milter_default_action": "tempfail", "mynetworks": "127.0.0.0/8",
                }, myhostname=f"{name}.mailwarden.test", syslog_name=f"postfix-{name}")
                started.append(FrontNode(name, milter, mx))
                reinject = mx.add_smtpd(REINJECT_OPTIONS)
                milter.config_path.write_text(milter.config_path.read_text() + (
                    f'socket_mode = "0666"\nclamd = ["{clamd.unix_address}"]\n'
                    f'reinject = "inet:127.0.0.1:{reinject}"\nscan_cache_ttl = 0\n'
                ))
                milter.start()
                mx.start()
            yield started[0], started[1], mailbox, nas
        finally:
            for node in started:
                node.mx.cleanup()
                node.milter.stop()
            shutil.rmtree(work, ignore_errors=True)


def test_what_one_node_quarantined_another_lists_shows_and_releases(
        nodes: tuple[FrontNode, FrontNode, SmtpSink, Path]) -> None:
    a, b, mailbox, nas = nodes
    from_a = a.quarantine("caught on mx-a")
    from_b = b.quarantine("caught on mx-b")
    assert mailbox.messages == []
    assert {p.name for p in nas.rglob("*.eml")} == {f"{from_a}.eml", f"{from_b}.eml"}
    assert not any((n.milter.dir / "quarantine").exists() for n in (a, b))

    # The same answer on every node.
    code, listed = b.cli("list")
    assert code == 0 and (code, listed) == a.cli("list")
    assert from_a in listed and from_b in listed and "[file missing]" not in listed
    code, shown = b.cli("show", from_a)
    assert code == 0, shown
    assert re.search(r"^node +mx-a$", shown, re.M) and "Subject: caught on mx-a" in shown

    # A node without the shared volume mounted says so, and releases nothing.
    unmounted = b.milter.dir / "unmounted.toml"
    unmounted.write_text(b.milter.config_path.read_text().replace(f'quarantine_dir = "{nas}"',
                                                                  f'quarantine_dir = "{b.milter.dir}/nas"'))
    code, out = run(unmounted, "quarantine", "list")
    assert code == 0 and out.count("[file missing]") == 2 and "2 of them without their file" in out
    code, out = run(unmounted, "quarantine", "release", from_a)
    assert code == 75 and "is the shared quarantine volume mounted on this node?" in out

    # Released on B: through B's Postfix to the mailbox host, then gone everywhere.
    code, out = b.cli("release", from_a)
    assert code == 0, out
    queue_id = out.rsplit("queued as ", 1)[1].strip()
    (copy,) = mailbox.wait_for(1, timeout=20)
    assert copy.recipients == (HELD,) and copy.header("Subject") == "caught on mx-a"
    assert EICAR in copy.data
    b.mx.wait_for_log(rf"{queue_id}: to=<{HELD}>.*status=sent")
    assert a.cli("show", from_a)[0] == 1 and b.cli("show", from_a)[0] == 1
    assert not list(nas.rglob(f"{from_a}.*"))

    # And what B quarantined, A deletes.
    assert a.cli("delete", from_b) == (0, f"{from_b}: deleted\n")
    assert list(nas.rglob("*.eml")) == []
    assert b.cli("list") == (0, "0 message(s)\n")
