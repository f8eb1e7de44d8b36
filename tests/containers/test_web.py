"""The web console on both front nodes, behind the balancer's HTTP frontend.

A domain administrator logs in through the balancer (plain HTTP: the stack's network
is private), switches a subscriber's service and sees it on that subscriber's
*explain* page; the session made through the balancer is honoured by each node
asked directly, since sessions live in the shared store and the nodes share the key."""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from harness.containers import BALANCER_WEB_PORT, SAMPLE_PASSWORD, WEB_PORT, MailStack

USER = "bob@example.com"
SERVICE = "keyword_filter"  # off for bob in the sample directory (mwDisabledService)


class Browser:
    """An HTTP client with its own cookie jar (the session cookie)."""

    def __init__(self) -> None:
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, url: str) -> tuple[int, str, str]:
        """(status, final URL after redirects, body)."""
        with self.opener.open(url, timeout=30) as reply:
            return reply.status, reply.geturl(), reply.read().decode()

    def cookie(self, name: str) -> str:
        return next(c.value for c in self.jar if c.name == name)

    def post(self, url: str, fields: dict[str, str]) -> tuple[int, str, str]:
        data = urllib.parse.urlencode(fields).encode()
        with self.opener.open(urllib.request.Request(url, data=data), timeout=30) as reply:
            return reply.status, reply.geturl(), reply.read().decode()


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page[:2000]
    return match.group(1)


def _login(browser: Browser, base: str, login: str) -> str:
    _, _, page = browser.get(f"{base}/login")
    fields = {"csrf": _csrf(page), "login": login, "password": SAMPLE_PASSWORD}
    _, landed, home = browser.post(f"{base}/login", fields)
    assert "/login" not in landed, home[:2000]
    return home


@pytest.fixture
def bob_restored(stack: MailStack) -> Iterator[None]:
    yield
    stack.mailwarden("user", "disable", USER, SERVICE, admin=True, check=False)


def test_a_domain_admin_switches_a_service_through_the_balancer_and_explain_shows_it(
    stack: MailStack, bob_restored: None
) -> None:
    base = f"http://{stack.ip('balancer')}:{BALANCER_WEB_PORT}"
    browser = Browser()
    _login(browser, base, "com-admin")
    _, _, page = browser.get(f"{base}/user/{USER}")
    off = rf'id="service-{SERVICE}">\s*<td>{SERVICE}</td>\s*<td class="state">off'
    assert re.search(off, page), page[:3000]
    status, _, _ = browser.post(f"{base}/user/{USER}",
                                {"csrf": _csrf(page), "service": SERVICE, "action": "enable"})
    assert status == 200
    _, _, explained = browser.get(f"{base}/explain?address={urllib.parse.quote(USER)}")
    row = re.search(rf'<tr id="explain-{SERVICE}">(.*?)</tr>', explained, re.S)
    assert row, explained[:3000]
    assert '<td class="state">on</td>' in row.group(1) and '<span class="source">user</span>' in row.group(1)
    # The directory has it, as the CLI sees it, and the audit log names the admin from the web.
    shown = json.loads(stack.mailwarden("explain", "--json", USER).stdout)
    assert shown["services"][SERVICE]["on"] and shown["services"][SERVICE]["source"] == "user", shown
    # The balancer's X-Forwarded-For names the client (this machine, the stack's gateway).
    shown_audit = stack.mailwarden("audit", "show", "--domain", "example.com", "--json", admin=True).stdout
    audit = [json.loads(line) for line in shown_audit.splitlines()]
    assert any(r["actor"] == "com-admin" and r["origin"] == f"web {stack.gateway}" and "bob" in r["target"]
               for r in audit), audit


def test_a_session_made_through_the_balancer_holds_on_every_node(stack: MailStack) -> None:
    browser = Browser()
    _login(browser, f"http://{stack.ip('balancer')}:{BALANCER_WEB_PORT}", "jp-admin")
    # The session cookie, as the balancer's address got it, sent to each node's own address.
    cookie = f"mw_session={browser.cookie('mw_session')}"
    for node in ("front", "front2"):
        request = urllib.request.Request(f"http://{stack.ip(node)}:{WEB_PORT}/explain?address=taro%40example.jp",
                                         headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as reply:
            landed, page = reply.geturl(), reply.read().decode()
        assert "/login" not in landed and "jp-admin" in page and 'id="explain-spam_check"' in page, \
            (node, landed, page[:2000])
    # Someone without the cookie is sent to the login page by either node.
    for node in ("front", "front2"):
        _, landed, _ = Browser().get(f"http://{stack.ip(node)}:{WEB_PORT}/explain?address=taro%40example.jp")
        assert "/login" in landed, (node, landed)
