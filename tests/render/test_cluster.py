"""Rendered Postfix and Dovecot on a cluster's services, run with the real binaries.

LDAP: ``[ldap] uri`` lists a syncrepl provider and its consumer (two real slapd). The
rendered Postfix tables and the Dovecot passdb/userdb list both, and answer with the
provider stopped.

Balancer: with ``[render] balancer_networks`` the client-facing listeners take the
client's address from HAProxy's PROXY protocol header (a real HAProxy in front).
"""

from __future__ import annotations

import http.server
import json
import poplib
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from harness.haproxy import HAPROXY, Frontend, HAProxy
from harness.postfix import send_mail
from harness.slapd import SERVICE_BIND, ReplicatedSlapd, SlapdServer
from tests.render.conftest import (
    RenderedDovecot,
    RenderedPostfix,
    Site,
    ldap_toml,
    need_dovecot,
    need_postfix,
    pop3_login,
    self_signed,
    site_root,
)

pytestmark = pytest.mark.slapd

T = TypeVar("T")


@pytest.fixture
def pair() -> Iterator[ReplicatedSlapd]:
    with ReplicatedSlapd() as running:
        yield running


def _ldap_toml(pair: ReplicatedSlapd) -> str:
    return (f'[ldap]\nuri = "{pair.uris}"\n{SERVICE_BIND}retry_max = 1\nretry_delay = 0.2\n'
            'network_timeout = 1.0\n')


def _settled(call: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """``call()`` again until ``ok`` says yes (a daemon reconnecting), or the last answer."""
    deadline = time.monotonic() + timeout
    while not ok(answer := call()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer


def test_postfix_ldap_tables_list_both_servers_and_answer_without_the_provider(
    pair: ReplicatedSlapd,
) -> None:
    need_postfix()
    with site_root() as root:
        site = Site(root, _ldap_toml(pair))
        site.postfix("route", "mx")
        route = RenderedPostfix(site, "route")
        table = (route.etc / "ldap-recipients.cf").read_text()
        assert f"server_host = {pair.uris}\n" in table
        assert route.lookup("ldap-recipients", "sales@example.com") == "alice@example.com"
        pair.provider.stop()
        assert route.lookup("ldap-recipients", "sales@example.com") == "alice@example.com"
        assert route.lookup("ldap-domains", "example.ne.jp") == "example.jp"
        assert RenderedPostfix(site, "mx").lookup("ldap-recipients", "taro@example.jp") is not None


def test_dovecot_ldap_lists_both_servers_and_answers_without_the_provider(pair: ReplicatedSlapd) -> None:
    need_dovecot()
    with site_root() as root:
        site = Site(root, _ldap_toml(pair))
        site.dovecot("mailbox")
        dovecot = RenderedDovecot(site, "mailbox")
        conf = dovecot.conf.parent
        ldap_files = sorted(conf.glob("mailwarden-*db-*.conf.ext"))
        assert len(ldap_files) == 5 and all(f"uris = {pair.uris}\n" in f.read_text() for f in ldap_files)
        dovecot.start(site.ports["lmtp"], site.ports["pop3"])
        try:
            assert dovecot.userdb("taro@example.jp") is not None
            pair.provider.stop()
            fields = _settled(lambda: dovecot.doveadm("user", "taro@example.jp"),
                              lambda res: res.returncode == 0)
            assert fields.returncode == 0, fields.stderr + dovecot.log()[-2000:]
            assert "example.jp/taro" in fields.stdout
        finally:
            dovecot.stop()


# ---------------------------------------------------------------- behind HAProxy


class _Server(socketserver.ThreadingTCPServer):
    # Postfix and Dovecot keep their connections open: closing must not wait for them.
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class Recorder:
    """A stand-in for the policy daemon's two endpoints that records what it is sent:
    policy requests (answered DUNNO) and Dovecot's login reports (answered ok)."""

    def __init__(self, policy_port: int, report_port: int) -> None:
        self.requests: list[dict[str, str]] = []
        self.reports: list[dict[str, object]] = []
        recorder = self

        class Policy(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                attrs: dict[str, str] = {}
                for raw in self.rfile:
                    line = raw.decode().rstrip("\n")
                    if line:
                        name, _, value = line.partition("=")
                        attrs[name] = value
                        continue
                    recorder.requests.append(attrs)
                    attrs = {}
                    self.wfile.write(b"action=DUNNO\n\n")

        class Report(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.reports.append(json.loads(body))
                answer = b'{"status":0,"msg":"ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.servers: list[socketserver.BaseServer] = [
            _Server(("127.0.0.1", policy_port), Policy),
            _HttpServer(("127.0.0.1", report_port), Report),
        ]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


BALANCED = '\nbalancer_networks = ["127.0.0.1/32"]\n'


@pytest.fixture
def balanced_site(slapd: SlapdServer) -> Iterator[Site]:
    """A site whose client-facing listeners sit behind a balancer on 127.0.0.1."""
    with site_root() as root:
        yield Site(root, ldap_toml(slapd), BALANCED)


def test_balancer_settings_are_rendered_only_when_set(balanced_site: Site, site: Site) -> None:
    for rendered_site, expected in ((balanced_site, True), (site, False)):
        rendered_site.postfix("mx", "submission", "pop-before-smtp")
        rendered_site.dovecot("proxy", "mailbox")
        etc = rendered_site.root / "etc"
        for role in ("mx", "submission", "pop-before-smtp"):  # one client-facing service each here
            master = (etc / f"postfix-{role}" / "master.cf").read_text()
            assert master.count("-o smtpd_upstream_proxy_protocol=haproxy") == int(expected), role
        # Never on the MX's outbound service, which only this node's inner stages use.
        outbound = (etc / "postfix-mx" / "master.cf").read_text().split("/outbound", 1)[1]
        assert "proxy_protocol" not in outbound
        proxy = (etc / "dovecot-proxy" / "dovecot.conf").read_text()
        assert ("haproxy_trusted_networks = 127.0.0.1/32" in proxy) is expected
        assert proxy.count("haproxy = yes") == (4 if expected else 0)  # imap(s), pop3(s)
    # A mailbox host behind proxies is not where clients connect.
    mailbox = (balanced_site.root / "etc" / "dovecot-mailbox" / "dovecot.conf").read_text()
    assert "haproxy" in mailbox  # proxy_networks is empty in this site: clients reach it directly
    behind = balanced_site.copy()
    behind.text += 'proxy_networks = ["127.0.0.1/32"]\n'
    behind.dovecot("mailbox")
    assert "haproxy" not in (behind.root / "etc" / "dovecot-mailbox" / "dovecot.conf").read_text()


def test_balancer_networks_are_checked(site: Site) -> None:
    from mailwarden.render import check

    broken = site.copy()
    broken.text += 'balancer_networks = ["10.0.0.0/8", "balancer.example"]\n'
    assert check(broken.config) == [
        "render.balancer_networks[1]: 'balancer.example' is not an address or network"]


def test_the_client_address_passes_haproxy_to_postfix_and_dovecot(balanced_site: Site, running: list) -> None:
    """Real HAProxy with send-proxy (v1) to the rendered POP-before-SMTP edge and
    send-proxy-v2 to the rendered Dovecot proxy: the policy request and Dovecot's login
    (its log and its login report) carry the client's address, 127.0.0.2, not the
    balancer's 127.0.0.1."""
    need_postfix()
    need_dovecot()
    if HAPROXY is None:
        pytest.skip("haproxy not installed")
    site = balanced_site
    ports = site.ports
    recorder = Recorder(ports["policyd"], ports["login_report"])
    try:
        self_signed(site)
        site.postfix("pop-before-smtp")
        edge = RenderedPostfix(site, "pop-before-smtp")
        edge.set(smtp_dns_support_level="disabled", smtpd_peername_lookup="no", smtpd_milters="",
                 smtpd_error_sleep_time="0", smtpd_upstream_proxy_timeout="1s")
        edge.start()
        running.append(edge)
        front = site.as_proxy()
        front.dovecot("proxy")
        proxy = RenderedDovecot(front, "proxy")
        proxy.start(ports["proxy_pop3"], ports["sasl"])
        running.append(proxy)
        with HAProxy([Frontend("smtp", ports["pop_before_smtp"], "send-proxy"),
                      Frontend("pop3", ports["proxy_pop3"], "send-proxy-v2")]) as balancer:
            _through_the_balancer(balancer, recorder, proxy)
        # Without the balancer's header the listeners refuse the connection.
        direct = send_mail("127.0.0.1", ports["pop_before_smtp"], "someone@outside.test",
                           ["taro@example.jp"], source_address="127.0.0.2")
        assert not direct.accepted
    finally:
        recorder.close()


def _through_the_balancer(balancer: HAProxy, recorder: Recorder, proxy: RenderedDovecot) -> None:
    result = send_mail("127.0.0.1", balancer.port("smtp"), "someone@outside.test", ["taro@example.jp"],
                       source_address="127.0.0.2")
    assert result.accepted, result
    rcpt = [r for r in recorder.requests if r.get("protocol_state") == "RCPT"]
    assert rcpt and rcpt[0]["client_address"] == "127.0.0.2", recorder.requests

    with pytest.raises(poplib.error_proto):
        pop3_login(balancer.port("pop3"), "taro@example.jp", "wrong", source="127.0.0.2")
    log = _settled(proxy.log, lambda text: "rip=127.0.0.2" in text)
    assert "rip=127.0.0.2" in log, log[-2000:]
    report = _settled(lambda: recorder.reports, bool)
    assert report and report[0]["remote"] == "127.0.0.2", report
