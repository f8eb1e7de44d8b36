"""The policy daemon end to end: relay rights, SMTP-AUTH senders, POP-before-SMTP, rate
limits and failure behaviour, through real Postfix, Dovecot, slapd and redis-server.

Wiring (as docs/policyd.md and the edge roles in postfix-templates/ do it):

- ``mailwarden --config policyd.toml policyd run`` on free loopback ports, with the
  store on a real redis-server, DNS on a stub, and only 127.0.0.1 trusted; a second
  node (its own process and ports, the same directory and store) answers a third
  smtpd, to show that a window opened on one node serves on another;
- Postfix asks it in ``smtpd_relay_restrictions`` (then ``reject_unauth_destination``)
  and in ``smtpd_end_of_data_restrictions``; ``smtpd_policy_service_default_action``
  makes a dead daemon a 451 instead of an accept;
- the main smtpd (the MX / POP-before-SMTP port) and a submission smtpd with SMTP AUTH
  through Dovecot SASL (a login is required to use it at all);
- Dovecot authenticates against the same slapd and reports every POP3/IMAP login to
  the daemon's login-report endpoint;
- relayed mail goes to a recording sink ("the Internet").

Clients bind to 127.0.0.2 and up, so the daemon sees untrusted client addresses.
Settings a scenario needs are changed the way an operator would: with
``mailwarden user set`` against LDAP, before the daemon first looks at that subscriber.
"""

from __future__ import annotations

import imaplib
import poplib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.dnsstub import StubDns
from harness.dovecot import DovecotServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, SmtpResult
from harness.redisserver import RedisServer
from harness.slapd import SERVICE_BIND, SlapdServer, mailwarden_database
from harness.smtpsink import SmtpSink
from mailwarden.store import Store, open_store
from tests.conftest import ADMIN_DN
from tests.e2e.conftest import HOSTED_DOMAINS, MAILWARDEN, PolicydProcess, skip_without_mail_stack

pytestmark = [pytest.mark.slapd, pytest.mark.redis, skip_without_mail_stack()]

KEY_PREFIX = "mwe2e:"
OUTSIDE = "friend@example.org"  # not hosted here: sending to it is relaying
DEFAULT_ACTION = "451 4.3.5 mailwarden policy service unavailable"
PBS_TTL = 10  # the smallest pop_before_smtp_ttl the catalogue allows
RATE_LIMIT = 3
SCENARIO_SETTINGS = [
    ("pbs@example.jp", "pop_before_smtp_ttl", str(PBS_TTL)),
    ("prof@lab.example.org", "rate_limit_messages", str(RATE_LIMIT)),
]


@dataclass
class World:
    """Everything one module's scenarios run against."""

    slapd: SlapdServer
    redis: RedisServer
    policyd: PolicydProcess
    dovecot: DovecotServer
    mx: PostfixInstance
    submission_port: int
    sink: SmtpSink
    store: Store
    """The daemon's shared store, read directly (POP-before-SMTP windows)."""
    node_b: PolicydProcess
    node_b_port: int
    """An smtpd that asks ``node_b`` instead of ``policyd``."""

    def submit(self, login: tuple[str, str], sender: str, recipients: list[str],
               client: str = "127.0.0.3") -> SmtpResult:
        """Mail through the submission port after SMTP AUTH."""
        return self.mx.send(sender, recipients, port=self.submission_port, login=login,
                            source_address=client)


def user_set(admin_config: Path, address: str, setting: str, value: str) -> None:
    """``mailwarden user set`` as the directory admin (what an operator runs)."""
    res = subprocess.run([str(MAILWARDEN), "--config", str(admin_config), "user", "set",
                          address, setting, value], capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0, res.stderr


def config_text(slapd: SlapdServer, redis: RedisServer, dns: StubDns, policy_port: int,
                report_port: int, *, admin: bool = False) -> str:
    bind = f'bind_dn = "{ADMIN_DN}"\nbind_password = "secret"\n' if admin else SERVICE_BIND
    return f"""\
[general]
node_name = "e2e"
log_level = "debug"  # ignored login reports are logged at debug level
log_target = "stderr"

[ldap]
uri = "{slapd.uri}"
{bind}retry_max = 1
retry_delay = 0.2
network_timeout = 1.0
timeout = 2.0

[store]
backend = "redis"
redis_url = "{redis.url}"
key_prefix = "{KEY_PREFIX}"
timeout = 1.0

[dns]
nameservers = ["127.0.0.1"]
port = {dns.port}
timeout = 0.5
lifetime = 1.0

[policyd]
listen = ["inet:127.0.0.1:{policy_port}"]
login_report_listen = ["inet:127.0.0.1:{report_port}"]
trusted_networks = ["127.0.0.1/32"]
request_timeout = 5.0
"""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    work = Path(tempfile.mkdtemp(prefix="mw-e2e-policyd-"))
    # Its own slapd: scenarios write to it (as an operator would) and stop it.
    with SlapdServer([mailwarden_database()]) as slapd, RedisServer() as redis, StubDns() as dns, \
            SmtpSink() as sink:
        policy_port, report_port = free_port(), free_port()
        config = work / "policyd.toml"
        config.write_text(config_text(slapd, redis, dns, policy_port, report_port))
        admin = work / "admin.toml"
        admin.write_text(config_text(slapd, redis, dns, policy_port, report_port, admin=True))
        # What an operator sets for these scenarios, before the daemon caches anything.
        for address, setting, value in SCENARIO_SETTINGS:
            user_set(admin, address, setting, value)
        policyd = PolicydProcess(config, policy_port, report_port).start()
        b_policy, b_report = free_port(), free_port()
        config_b = work / "node-b.toml"
        config_b.write_text(config_text(slapd, redis, dns, b_policy, b_report))
        node_b = PolicydProcess(config_b, b_policy, b_report).start()
        store = open_store("redis", sqlite_path="", redis_url=redis.url, key_prefix=KEY_PREFIX,
                           timeout=2.0)
        check = (f"check_policy_service {{ {policyd.endpoint}, timeout=10s, "
                 f"{{ default_action = {DEFAULT_ACTION} }} }}")
        try:
            with DovecotServer(slapd.uri, login_report_url=policyd.report_url) as dovecot:
                mx = PostfixInstance(main_cf={
                    "relayhost": sink.relayhost,
                    "virtual_mailbox_domains": HOSTED_DOMAINS,
                    "virtual_transport": dovecot.lmtp_nexthop,
                    "smtpd_relay_restrictions": f"{check}, reject_unauth_destination",
                    "smtpd_end_of_data_restrictions": check,
                    "smtpd_policy_service_default_action": DEFAULT_ACTION,
                    # A dead daemon answers at once instead of after a retry.
                    "smtpd_policy_service_try_limit": "1",
                })
                via_b = mx.add_smtpd({
                    "syslog_name": "postfix-mw/node-b",
                    "smtpd_relay_restrictions":
                        f"check_policy_service {node_b.endpoint}, reject_unauth_destination",
                    "smtpd_end_of_data_restrictions": f"check_policy_service {node_b.endpoint}",
                })
                submission = mx.add_smtpd({
                    **dovecot.postfix_sasl_settings(),
                    "syslog_name": "postfix-mw/submission",
                    "smtpd_client_restrictions": "permit_sasl_authenticated, reject",
                })
                with mx:
                    yield World(slapd, redis, policyd, dovecot, mx, submission, sink, store,
                                node_b, via_b)
        finally:
            store.close()
            policyd.stop()
            node_b.stop()
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh(world: World) -> Iterator[None]:
    # The sink records a message before answering 250, so an empty queue means that
    # everything an earlier scenario sent has arrived and can be forgotten.
    world.mx.wait_queue_empty()
    world.sink.clear()
    yield
    # A scenario that stopped a daemon must not leave it stopped for the next one.
    if world.policyd.proc is None:
        world.policyd.start()


def assert_nothing_relayed(world: World) -> None:
    world.mx.wait_queue_empty()
    assert [m for m in world.sink.messages if m.envelope_sender] == []


class Pop3From(poplib.POP3):
    """poplib.POP3 from a chosen loopback address, so Dovecot sees that client IP."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class Imap4From(imaplib.IMAP4):
    """imaplib.IMAP4 from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


def wait_for_window(world: World, client: str, since: int) -> None:
    """Wait until Dovecot's login report opened a POP-before-SMTP window for ``client``."""
    deadline = time.monotonic() + 5
    while world.store.get(f"pbs:{client}") is None:
        assert time.monotonic() < deadline, world.policyd.log_text(since)
        time.sleep(0.05)


def pop3_login(world: World, user: str, client: str) -> None:
    pop = Pop3From("127.0.0.1", world.dovecot.pop3_port, client)
    try:
        pop.user(user)
        pop.pass_("secret")
    finally:
        pop.quit()


# -- relay rights -------------------------------------------------------------------------


def test_relay_from_outside_is_refused_and_nothing_leaves(world: World) -> None:
    since, psince = world.mx.log_offset(), world.policyd.log_offset()
    result = world.mx.send("someone@example.net", [OUTSIDE], source_address="127.0.0.2")
    code, text = result.rcpt[OUTSIDE]
    # Postfix puts its own "Recipient address rejected:" before the daemon's text.
    assert code == 554 and text.startswith("5.7.1 ") and text.endswith(f"<{OUTSIDE}>: Relay access denied")
    assert result.data == (0, "")
    world.mx.wait_for_log(rf"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]:\d+: 554 5\.7\.1 "
                          rf".*<{OUTSIDE}>: Relay access denied", since=since)
    world.policyd.wait_for_log(r"third-party relay refused", since=psince)
    assert_nothing_relayed(world)


def test_mail_for_a_hosted_subscriber_needs_no_relay_right(world: World) -> None:
    result = world.mx.send("someone@example.net", ["bob@example.com"], source_address="127.0.0.2")
    assert result.accepted
    world.mx.wait_for_log(rf"{result.queue_id}: to=<bob@example.com>, relay=127\.0\.0\.1.*status=sent")
    assert_nothing_relayed(world)


# -- SMTP AUTH --------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["taro@example.jp", "taro.yamada@example.jp", "taro@example.ne.jp"])
def test_smtp_auth_login_may_relay_with_its_own_addresses(world: World, sender: str) -> None:
    since = world.mx.log_offset()
    result = world.submit(("taro@example.jp", "secret"), sender, [OUTSIDE])
    assert result.accepted, result
    [msg] = world.sink.wait_for(1)
    assert (msg.envelope_sender, msg.recipients) == (sender, (OUTSIDE,))
    world.mx.wait_for_log(rf"{result.queue_id}: client=unknown\[127\.0\.0\.3\]:\d+, sasl_method=PLAIN, "
                          r"sasl_username=taro@example.jp", since=since)


def test_sender_not_owned_by_the_login_is_refused(world: World) -> None:
    since = world.mx.log_offset()
    result = world.submit(("taro@example.jp", "secret"), "hanako@example.jp", [OUTSIDE])
    code, text = result.rcpt[OUTSIDE]
    assert code == 553
    assert text.endswith("<hanako@example.jp>: Sender address not owned by user taro@example.jp")
    world.mx.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.3\].*: 553 5\.7\.1 .*"
                          r"<hanako@example\.jp>: Sender address not owned", since=since)
    assert_nothing_relayed(world)


def test_login_without_the_smtp_auth_service_may_not_relay(world: World) -> None:
    # pbs@example.jp has a valid password (Dovecot accepts it) but no smtp_auth service.
    psince = world.policyd.log_offset()
    result = world.submit(("pbs@example.jp", "secret"), "pbs@example.jp", [OUTSIDE])
    assert result.auth is not None and result.auth[0] == 235
    code, text = result.rcpt[OUTSIDE]
    assert code == 554 and text.startswith("5.7.1 ")
    world.policyd.wait_for_log(r"third-party relay refused \(login may not relay\)", since=psince)
    assert_nothing_relayed(world)


def test_smtp_auth_login_does_not_open_pop_before_smtp(world: World) -> None:
    # carol has both services; her SMTP AUTH (Dovecot reports protocol "smtp") must not
    # let the same IP relay without a login afterwards.
    psince = world.policyd.log_offset()
    assert world.submit(("carol@example.com", "secret"), "carol@example.com", [OUTSIDE],
                        client="127.0.0.6").accepted
    world.sink.wait_for(1)
    world.policyd.wait_for_log(r"login report smtp 'carol@example.com' \[127\.0\.0\.6\]: "
                               r"ignored: protocol smtp", since=psince)
    anonymous = world.mx.send("carol@example.com", [OUTSIDE], source_address="127.0.0.6")
    assert anonymous.rcpt[OUTSIDE][0] == 554
    assert world.store.get("pbs:127.0.0.6") is None


# -- POP-before-SMTP --------------------------------------------------------------------------


def test_pop3_login_opens_relay_for_its_ip_until_the_ttl_ends(world: World) -> None:
    client, other = "127.0.0.4", "127.0.0.5"
    before = world.mx.send("pbs@example.jp", [OUTSIDE], source_address=client)
    assert before.rcpt[OUTSIDE][0] == 554

    psince = world.policyd.log_offset()
    pop3_login(world, "pbs@example.jp", client)
    opened = time.monotonic()
    wait_for_window(world, client, psince)
    store = world.store
    assert store.get(f"pbs:{client}") == "pbs@example.jp"
    ttl = store.ttl(f"pbs:{client}")
    assert ttl is not None and 0 < ttl <= PBS_TTL

    during = world.mx.send("pbs@example.jp", [OUTSIDE], source_address=client)
    assert during.accepted, during
    [msg] = world.sink.wait_for(1)
    assert msg.recipients == (OUTSIDE,)
    assert world.mx.send("pbs@example.jp", [OUTSIDE], source_address=other).rcpt[OUTSIDE][0] == 554

    while store.get(f"pbs:{client}") is not None:
        assert time.monotonic() < opened + PBS_TTL + 5
        time.sleep(0.2)
    after = world.mx.send("pbs@example.jp", [OUTSIDE], source_address=client)
    assert after.rcpt[OUTSIDE][0] == 554
    assert len([m for m in world.sink.messages if m.envelope_sender]) == 1


def test_imap_login_opens_relay_too(world: World) -> None:
    client = "127.0.0.10"
    assert world.mx.send("carol@example.com", [OUTSIDE], source_address=client).rcpt[OUTSIDE][0] == 554
    psince = world.policyd.log_offset()
    imap = Imap4From("127.0.0.1", world.dovecot.imap_port, client)
    try:
        assert imap.login("carol@example.com", "secret")[0] == "OK"
    finally:
        imap.logout()
    wait_for_window(world, client, psince)
    result = world.mx.send("carol@example.com", [OUTSIDE], source_address=client)
    assert result.accepted, result
    assert [m.recipients for m in world.sink.wait_for(1)] == [(OUTSIDE,)]


def test_window_opened_on_one_node_lets_another_node_relay(world: World) -> None:
    client = "127.0.0.12"
    psince = world.policyd.log_offset()
    bsince = world.node_b.log_offset()
    assert world.mx.send("carol@example.com", [OUTSIDE], port=world.node_b_port,
                         source_address=client).rcpt[OUTSIDE][0] == 554
    pop3_login(world, "carol@example.com", client)  # reported to the first node only
    wait_for_window(world, client, psince)
    assert "window opened" not in world.node_b.log_text(bsince)
    result = world.mx.send("carol@example.com", [OUTSIDE], port=world.node_b_port, source_address=client)
    assert result.accepted, result
    world.node_b.wait_for_log(r"POP-before-SMTP user carol@example\.com", since=bsince)
    assert [m.recipients for m in world.sink.wait_for(1)] == [(OUTSIDE,)]


def test_failed_pop3_login_opens_nothing(world: World) -> None:
    client = "127.0.0.7"
    psince = world.policyd.log_offset()
    pop = Pop3From("127.0.0.1", world.dovecot.pop3_port, client)
    try:
        pop.user("carol@example.com")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
    finally:
        pop.quit()
    world.policyd.wait_for_log(r"login report pop3 'carol@example.com' \[127\.0\.0\.7\]: "
                               r"ignored: login failed", since=psince)
    assert world.store.get(f"pbs:{client}") is None
    assert world.mx.send("carol@example.com", [OUTSIDE], source_address=client).rcpt[OUTSIDE][0] == 554


# -- rate limits ------------------------------------------------------------------------------


def test_rate_limit_lets_n_messages_through_then_defers(world: World) -> None:
    login = ("prof@lab.example.org", "secret")
    for i in range(RATE_LIMIT):
        assert world.submit(login, "prof@lab.example.org", [OUTSIDE], client="127.0.0.8").accepted, i
    since = world.mx.log_offset()
    fourth = world.submit(login, "prof@lab.example.org", [OUTSIDE], client="127.0.0.8")
    assert not fourth.accepted
    code, text = fourth.refusal
    assert code == 450 and text.startswith("4.7.1 ") and "Rate limit" in text
    world.mx.wait_for_log(r"reject: (RCPT|END-OF-MESSAGE) from unknown\[127\.0\.0\.8\].*: 450 4\.7\.1 "
                          r".*Rate limit", since=since)
    world.mx.wait_queue_empty()
    assert len(world.sink.messages_for(OUTSIDE)) == RATE_LIMIT


# -- failures: never an accept -------------------------------------------------------------


def test_policy_daemon_down_means_tempfail_not_accept(world: World) -> None:
    world.policyd.stop()
    since = world.mx.log_offset()
    result = world.submit(("taro@example.jp", "secret"), "taro@example.jp", [OUTSIDE])
    code, text = result.rcpt[OUTSIDE]
    assert code == 451 and text.startswith("4.3.5 ")
    assert text.endswith("mailwarden policy service unavailable")
    world.mx.wait_for_log(r"problem talking to server 127\.0\.0\.1:\d+", since=since)
    assert_nothing_relayed(world)

    world.policyd.start()
    again = world.submit(("taro@example.jp", "secret"), "taro@example.jp", [OUTSIDE])
    assert again.accepted


def test_directory_down_means_tempfail_not_accept(world: World) -> None:
    world.slapd.stop()
    try:
        # A recipient domain the daemon has never looked up, so no cached answer helps.
        result = world.mx.send("someone@example.net", ["friend@fresh.example"], source_address="127.0.0.9")
        code, text = result.rcpt["friend@fresh.example"]
        assert code == 451 and text.startswith("4.3.0")
    finally:
        world.slapd.start()
    assert_nothing_relayed(world)


def test_store_down_means_tempfail_not_accept(world: World) -> None:
    # Without the store the daemon cannot tell whether this IP has a POP-before-SMTP
    # window: the relay check's failure action (tempfail) must apply, not a refusal
    # or a pass.
    world.redis.stop()
    try:
        result = world.mx.send("someone@example.net", [OUTSIDE], source_address="127.0.0.11")
        code, text = result.rcpt[OUTSIDE]
        assert code == 451 and text.startswith("4.3.0")
    finally:
        world.redis.start()
    assert_nothing_relayed(world)
