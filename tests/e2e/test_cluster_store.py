"""Two policy daemon nodes share one store through Redis Sentinel.

Two real ``mailwarden policyd run`` processes (node A and node B, their own ports, the
same slapd and the same Sentinel-backed store) answer policy requests over TCP the way
Postfix asks them. A POP3 login reported to node A opens relay for that client address
on node B. A client rate limit counted on node A holds on node B. Both still hold after
the primary was killed and the Sentinels promoted the replica. Postfix is not needed
here: the requests are the ones its smtpd sends (tests/e2e/test_policyd.py has them
through a real Postfix).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.sentinel import SentinelCluster, missing_sentinel
from harness.slapd import SERVICE_BIND, SlapdServer
from tests.e2e.conftest import PolicydProcess
from tests.policyd.conftest import PolicyClient

pytestmark = [
    pytest.mark.slapd,
    pytest.mark.redis,
    pytest.mark.skipif(missing_sentinel() is not None, reason=str(missing_sentinel())),
]

CLIENT_LIMIT = 2  # [policyd.rate_limit.client] messages


@dataclass
class Nodes:
    a: PolicydProcess
    b: PolicydProcess
    cluster: SentinelCluster


def _config(slapd: SlapdServer, cluster: SentinelCluster, policy_port: int, report_port: int) -> str:
    sentinels = ", ".join(f'"{a}"' for a in cluster.addresses)
    return f"""\
[general]
node_name = "node-{policy_port}"
log_target = "stderr"

[ldap]
uri = "{slapd.uri}"
{SERVICE_BIND}
[store]
backend = "redis"
redis_url = "{cluster.url}"
key_prefix = "mwcluster:"
timeout = 0.5
sentinels = [{sentinels}]

[policyd]
listen = ["inet:127.0.0.1:{policy_port}"]
login_report_listen = ["inet:127.0.0.1:{report_port}"]
trusted_networks = ["127.0.0.1/32"]
checks = ["relay", "rate_limit"]

[policyd.rate_limit.client]
messages = {CLIENT_LIMIT}
"""


@pytest.fixture(scope="module")
def nodes(slapd: SlapdServer) -> Iterator[Nodes]:
    work = Path(tempfile.mkdtemp(prefix="mw-cluster-store-"))
    with SentinelCluster() as cluster:
        started: list[PolicydProcess] = []
        try:
            for name in ("a", "b"):
                policy_port, report_port = free_port(), free_port()
                config = work / f"node-{name}.toml"
                config.write_text(_config(slapd, cluster, policy_port, report_port))
                started.append(PolicydProcess(config, policy_port, report_port).start())
            yield Nodes(started[0], started[1], cluster)
        finally:
            for node in started:
                node.stop()
            shutil.rmtree(work, ignore_errors=True)


def _ask(node: PolicydProcess, **attrs: str) -> str:
    client = PolicyClient(node.endpoint)
    try:
        return client.ask(**attrs)
    finally:
        client.close()


def _report_login(node: PolicydProcess, user: str, remote: str) -> None:
    """What Dovecot's auth process POSTs after a successful POP3 login."""
    body = json.dumps({"login": user, "protocol": "pop3", "remote": remote, "user": user,
                       "success": True, "policy_reject": False, "tls": False}).encode()
    req = urllib.request.Request(node.report_url + "?command=report", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": 0, "msg": "ok"}


def _relay(node: PolicydProcess, client: str) -> str:
    return _ask(node, client_address=client, sender="pbs@example.jp", recipient="friend@example.org")


def _message(node: PolicydProcess, client: str) -> str:
    """END-OF-MESSAGE of one message from an anonymous client to a hosted subscriber."""
    return _ask(node, protocol_state="END-OF-MESSAGE", client_address=client, recipient="",
                recipient_count="1", size="1000", sender="someone@outside.example")


def _until_answered(call: Callable[[], str], timeout: float = 8.0) -> str:
    """The first answer that is not the store's temporary failure (a failover runs)."""
    deadline = time.monotonic() + timeout
    while True:
        action = call()
        if not action.startswith(("DEFER", "451", "450 4.3")) or time.monotonic() > deadline:
            return action
        time.sleep(0.2)


def test_a_login_on_node_a_opens_relay_on_node_b(nodes: Nodes) -> None:
    assert _relay(nodes.b, "198.51.100.7").startswith("554")
    _report_login(nodes.a, "pbs@example.jp", "198.51.100.7")
    assert not _relay(nodes.b, "198.51.100.7").startswith(("4", "5", "DEFER", "REJECT"))
    assert _relay(nodes.b, "198.51.100.8").startswith("554")  # that client address only


def test_a_rate_limit_counted_on_node_a_holds_on_node_b(nodes: Nodes) -> None:
    for _ in range(CLIENT_LIMIT):
        assert _message(nodes.a, "203.0.113.50") == "DUNNO"
    assert _message(nodes.b, "203.0.113.50").startswith("450 4.7.1")
    assert _message(nodes.b, "203.0.113.51") == "DUNNO"  # another client has its own count


def test_windows_and_counts_survive_a_failover(nodes: Nodes) -> None:
    _report_login(nodes.a, "pbs@example.jp", "198.51.100.20")
    for _ in range(CLIENT_LIMIT):
        assert _message(nodes.a, "203.0.113.60") == "DUNNO"
    time.sleep(0.2)  # asynchronous replication: let the replica catch up
    nodes.cluster.kill_primary()
    nodes.cluster.wait_failover()
    assert not _until_answered(lambda: _relay(nodes.b, "198.51.100.20")).startswith(
        ("4", "5", "DEFER", "REJECT"))
    assert _until_answered(lambda: _message(nodes.b, "203.0.113.60")).startswith("450 4.7.1")
