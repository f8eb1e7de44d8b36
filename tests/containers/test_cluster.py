"""The cluster: front nodes behind HAProxy, sharing Redis (through Sentinel) and the directory.

Which node a connection reached is read from the balancer's log (one line per
connection: client address and port, frontend, backend/server).
"""

from __future__ import annotations

import re
import threading
import time

from harness.containers import SAMPLE_PASSWORD, SERVICE_DN, SPARE_FRONT, MailStack
from harness.postfix import make_message
from harness.scrape import total
from tests.containers.conftest import DirectoryChanges

SUBMISSION, MX, POP_BEFORE_SMTP = 587, 25, 2525
BACKENDS = ("smtp", "submission", "submissions", "pbs", "pop3", "imap", "pop3s", "imaps", "web")


def wait_landed(stack: MailStack, frontend: str, source: str, count: int, after: int) -> list[str]:
    """The nodes of ``source``'s connections on ``frontend``, once ``count`` have ended."""
    deadline = time.monotonic() + 15
    while len(landed := stack.landed(frontend, source, after=after)) < count:
        assert time.monotonic() < deadline, (frontend, source, landed, stack.log_tails("balancer"))
        time.sleep(0.2)
    return landed


def test_every_front_node_is_in_service_behind_the_balancer(stack: MailStack) -> None:
    servers = stack.balancer_servers()
    for node in ("front", "front2"):
        for backend in BACKENDS:
            assert servers[(backend, node)] == "UP", (backend, node, servers)


def test_the_nodes_see_the_clients_own_address_not_the_balancers(stack: MailStack, token: str) -> None:
    client = stack.client_address(10)
    postfix_log, haproxy_log = stack.log_size("front"), stack.log_size("balancer", "haproxy")
    sent = 0
    while set(stack.landed("smtp", client, after=haproxy_log)) != {"front", "front2"}:
        assert sent < 6, stack.landed("smtp", client, after=haproxy_log)
        result = stack.send("balancer", MX, f"sender-{token}@elsewhere.test", ["taro@example.jp"],
                            source=client)
        assert result.data[0] == 250, result
        sent += 1
        wait_landed(stack, "smtp", client, sent, haproxy_log)
    for node in ("mx1", "mx2"):  # each node's Postfix logs its own name
        stack.wait_for_log("front", rf"^\w+ \d+ [\d:]+ {node} postfix-mx/smtpd/smtpd\[\d+\]: \w+: "
                           rf"client=[^\[\s]*\[{re.escape(client)}\]", after=postfix_log)
    new = stack.log("front")[postfix_log:]
    assert not re.search(rf"\w+: client=[^\[\s]*\[{re.escape(stack.ip('balancer'))}\]", new)
    stack.wait_for_messages(stack.maildir("taro@example.jp"), sent, match=f"sender-{token}@elsewhere.test")


def test_a_pop3_login_landing_on_one_node_opens_relay_on_the_other(stack: MailStack, token: str) -> None:
    laptop, friend = stack.client_address(11), f"friend-{token}@outside.test"
    haproxy_log, policyd_log = stack.log_size("balancer", "haproxy"), stack.log_size("front", "policyd")
    stack.pop3("pbs@example.jp", source=laptop).quit()
    [login_node] = wait_landed(stack, "pop3", laptop, 1, haproxy_log)
    stack.wait_for_log("front", rf"window opened for pbs@example\.jp from \[{re.escape(laptop)}\]",
                       name="policyd", after=policyd_log)
    relayed: list[str] = []
    while not relayed or relayed[-1] == login_node:
        assert len(relayed) < 6, relayed
        subject = f"relay {token} {len(relayed)}"
        result = stack.send("balancer", POP_BEFORE_SMTP, "pbs@example.jp", [friend],
                            make_message("pbs@example.jp", [friend], subject=subject), source=laptop)
        assert result.rcpt[friend] == (250, "2.1.5 Ok"), (relayed, result)
        relayed = wait_landed(stack, "pbs", laptop, len(relayed) + 1, haproxy_log)
    # The login was reported on one node, the relay was allowed on the other.
    assert relayed[-1] != login_node
    stack.wait_for_messages(stack.internet_maildir(), len(relayed), match=f"relay {token}",
                            delivered_to=friend)


def test_a_rate_limit_counted_on_one_node_holds_on_the_other(
    stack: MailStack, token: str, directory: DirectoryChanges
) -> None:
    forget = ("sh", "-c", "redis-cli -h $PRIMARY --scan --pattern 'mw:rl:user:taro@example.jp:*'"
              " | xargs -r redis-cli -h $PRIMARY del")
    stack.redis_cli(*forget)  # earlier submissions' count (the window is an hour)
    directory.set("user", "taro@example.jp", "rate_limit_messages", "1")
    friend = f"friend-{token}@outside.test"
    haproxy_log = stack.log_size("balancer", "haproxy")

    def submit(n: int) -> tuple[str, tuple[int, str]]:
        # A client address of its own for each, so the balancer's log tells them apart.
        source = stack.client_address(12 + n)
        result = stack.send("balancer", SUBMISSION, "taro@example.jp", [friend], source=source,
                            login=("taro@example.jp", SAMPLE_PASSWORD), starttls=True)
        [node] = wait_landed(stack, "submission", source, 1, haproxy_log)
        return node, result.rcpt[friend]

    try:
        counted_on, reply = submit(0)
        assert reply[0] == 250, reply
        nodes = []
        for n in range(1, 6):
            node, reply = submit(n)
            assert reply[0] == 450 and "Rate limit reached" in reply[1], (node, reply)
            nodes.append(node)
            if node != counted_on:
                break
        assert nodes[-1] != counted_on, f"no submission reached a node other than {counted_on}"
    finally:
        stack.redis_cli(*forget)  # the limit reached stays marked for the window


def test_metrics_move_when_mail_flows_on_the_nodes_and_in_prometheus(stack: MailStack, token: str) -> None:
    up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]  # type: ignore[index]
          for r in stack.prometheus("up")}
    for daemon, port in (("milter", 9101), ("policyd", 9102)):
        for node in ("front", "front2"):
            assert up[(f"mailwarden-{daemon}", f"{stack.ip(node)}:{port}")] == "1", up

    def accepted() -> float:
        return sum(total(stack.metrics(node, "milter"), "mailwarden_milter_messages_total", verdict="accept")
                   for node in ("front", "front2"))

    def in_prometheus() -> float:
        result = stack.prometheus('sum(mailwarden_milter_messages_total{verdict="accept"})')
        return float(result[0]["value"][1]) if result else 0.0  # type: ignore[index]

    before, before_prometheus = accepted(), in_prometheus()
    client = stack.client_address(18)
    for n in range(4):  # over both nodes (round robin)
        sender = f"metrics-{token}@elsewhere.test"
        result = stack.send("balancer", MX, sender, ["taro@example.jp"], source=client,
                            message=make_message(sender, ["taro@example.jp"], subject=f"metrics {token} {n}"))
        assert result.data[0] == 250, result
    deadline = time.monotonic() + 10  # the workers write their counts once a second
    while accepted() < before + 4:
        assert time.monotonic() < deadline, (before, accepted())
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # Prometheus scrapes every 5 s
    while in_prometheus() < before_prometheus + 4:
        assert time.monotonic() < deadline, (before_prometheus, in_prometheus())
        time.sleep(1)
    stack.wait_for_messages(stack.maildir("taro@example.jp"), 4, match=f"metrics {token}")


def test_a_third_front_node_added_under_load_takes_traffic_with_no_data_moved(
    stack: MailStack, token: str
) -> None:
    """The node starts from the image with the shared configuration, and one line in the
    balancer's node list puts it in service; mail sent meanwhile is all delivered."""
    client = stack.client_address(20)
    haproxy_log = stack.log_size("balancer", "haproxy")
    stop = threading.Event()
    replies: list[int] = []

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 100:
            sender = f"load-{token}@elsewhere.test"
            message = make_message(sender, ["taro@example.jp"], subject=f"load {token} {n}")
            result = stack.send("balancer", MX, sender, ["taro@example.jp"], message, source=client)
            replies.append(result.data[0] if result.data else result.connect[0])
            n += 1
            time.sleep(0.5)

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        stack.add(SPARE_FRONT)
        # A window opened before the node existed is honoured there: the state is shared.
        laptop = stack.client_address(21)
        stack.pop3("pbs@example.jp", source=laptop).quit()
        stack.balancer("add", SPARE_FRONT.name, stack.ip(SPARE_FRONT.name), "1")
        deadline = time.monotonic() + 60
        while SPARE_FRONT.name not in stack.landed("smtp", "", after=haproxy_log):
            assert time.monotonic() < deadline and sender.is_alive(), stack.log_tails("balancer")
            time.sleep(0.5)
        friend = f"friend-{token}@outside.test"
        source_relay: list[str] = []
        for n in range(6):
            result = stack.send("balancer", POP_BEFORE_SMTP, "pbs@example.jp", [friend], source=laptop)
            assert result.rcpt[friend][0] == 250, result
            source_relay = wait_landed(stack, "pbs", laptop, n + 1, haproxy_log)
            if source_relay[-1] == SPARE_FRONT.name:
                break
        assert SPARE_FRONT.name in source_relay
    finally:
        stop.set()
        sender.join(timeout=60)
        stack.balancer("remove", SPARE_FRONT.name)
        stack.remove(SPARE_FRONT.name)
    assert replies and set(replies) == {250}, replies
    stack.wait_for_messages(stack.maildir("taro@example.jp"), len(replies), match=f"load {token}",
                            timeout=60)


def test_directory_changes_go_to_the_provider_and_reach_the_consumer(
    stack: MailStack, directory: DirectoryChanges
) -> None:
    provider_log = stack.log_size("ldap", "slapd")
    directory.set("user", "jiro@example.jp", "spam_threshold", "6.5")
    assert re.search(r'MOD dn="uid=jiro,', stack.log("ldap", "slapd")[provider_log:])
    search = ("ldapsearch", "-x", "-LLL", "-H", "ldap://127.0.0.1/", "-D", SERVICE_DN, "-w", "secret",
              "-b", "dc=mailwarden,dc=test", "(mail=jiro@example.jp)", "mwSpamThreshold")
    deadline = time.monotonic() + 10
    while "mwSpamThreshold: 6.5" not in stack.exec("ldap2", *search).stdout:
        assert time.monotonic() < deadline, stack.exec("ldap2", *search).stdout
        time.sleep(0.5)
    # The consumer itself refuses a change, referring it to the provider.
    jiro = "uid=jiro,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test"
    refused = stack.exec("ldap2", "ldapmodify", "-x", "-H", "ldap://127.0.0.1/", "-D",
                         "cn=admin,dc=mailwarden,dc=test", "-w", "secret", check=False,
                         input=f"dn: {jiro}\nchangetype: modify\nreplace: mwSpamThreshold\n"
                               "mwSpamThreshold: 7\n")
    assert refused.returncode != 0 and f"ldap://{stack.ip('ldap')}/" in refused.stdout + refused.stderr
