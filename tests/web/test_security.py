"""The console's security mechanics with Starlette's TestClient and a fake directory gate:
CSRF on every change, session lifetime, login throttling per account and per client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from starlette.testclient import TestClient

from mailwarden.access import Role
from mailwarden.config import parse_config
from mailwarden.store import MemoryStore, ThreadedStore
from mailwarden.web.app import Services, create_app
from mailwarden.web.i18n import pick_language
from mailwarden.web.security import COOKIE
from tests.web.fakes import FakeGate

SECRET = b"k" * 40


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Console:
    client: TestClient
    gate: FakeGate
    clock: Clock
    store: MemoryStore


def _console(web: str = "") -> Console:
    clock = Clock()
    store = MemoryStore(clock=clock)
    gate = FakeGate()
    gate.directory.add_domain("example.com")
    gate.directory.add_user("alice@example.com")
    gate.add("alice@example.com", "pw-alice", Role.END_USER, address="alice@example.com",
             domain="example.com")
    gate.add("boss", "pw-boss", Role.DOMAIN_ADMIN, domains=("example.com",))
    cookies = "" if "secure_cookies" in web else "secure_cookies = false\n"
    config = parse_config(f"[web]\n{cookies}{web}", "test.toml")
    app = create_app(Services(config=config, gate=gate, store=ThreadedStore(store), secret=SECRET,
                              clock=clock))
    scheme = "https" if "secure_cookies = true" in web else "http"
    return Console(TestClient(app, base_url=f"{scheme}://testserver"), gate, clock, store)


@pytest.fixture
def console() -> Iterator[Console]:
    c = _console()
    with c.client:
        yield c


def login(c: TestClient, account: str, password: str) -> int:
    page = c.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    return c.post("/login", data={"csrf": token.group(1), "login": account, "password": password},
                  follow_redirects=False).status_code


def csrf_of(c: TestClient, path: str = "/explain") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', c.get(path).text)
    assert found
    return found.group(1)


def test_a_forged_post_without_the_token_changes_nothing(console: Console) -> None:
    c = console.client
    assert login(c, "boss", "pw-boss") == 303
    form = {"set:spam_threshold": "3"}
    forged = c.post("/user/alice@example.com", data=form, follow_redirects=False)
    assert forged.status_code == 403
    wrong = c.post("/user/alice@example.com", data={**form, "csrf": "guessed"}, follow_redirects=False)
    assert wrong.status_code == 403
    assert console.gate.writes == []
    # The same change with the session's token goes through.
    done = c.post("/user/alice@example.com", data={**form, "csrf": csrf_of(c)}, follow_redirects=False)
    assert done.status_code == 303
    assert console.gate.writes == [("boss", "uid=alice,mwDomainName=example.com,ou=domains",
                                    {"spam_threshold": ["3.0"]})]


def test_another_sessions_token_is_refused(console: Console) -> None:
    other = _console()
    other.client.__enter__()
    try:
        assert login(other.client, "boss", "pw-boss") == 303
        stolen = csrf_of(other.client)
    finally:
        other.client.__exit__(None, None, None)
    c = console.client
    assert login(c, "boss", "pw-boss") == 303
    r = c.post("/user/alice@example.com", data={"set:spam_threshold": "3", "csrf": stolen},
               follow_redirects=False)
    assert r.status_code == 403 and console.gate.writes == []


def test_logout_and_quarantine_changes_need_the_token(console: Console) -> None:
    c = console.client
    assert login(c, "alice@example.com", "pw-alice") == 303
    assert c.post("/logout", follow_redirects=False).status_code == 403
    assert c.post("/quarantine/20260101000000-0123456789abcdef/delete",
                  follow_redirects=False).status_code == 403
    assert c.get("/me/filters", follow_redirects=False).status_code == 200  # still logged in


def test_the_login_form_needs_its_token(console: Console) -> None:
    r = console.client.post("/login", data={"login": "boss", "password": "pw-boss"}, follow_redirects=False)
    assert r.status_code == 403 and console.gate.attempts == 0


def test_a_session_ends_after_its_lifetime() -> None:
    c = _console("session_lifetime = 600\n")
    with c.client as client:
        assert login(client, "boss", "pw-boss") == 303
        cookie = client.cookies.get(COOKIE)
        assert cookie and len(cookie) >= 40
        assert client.get("/explain", follow_redirects=False).status_code == 200
        c.clock.now += 599
        assert client.get("/explain", follow_redirects=False).status_code == 200
        c.clock.now += 2
        r = client.get("/explain", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"


def test_the_session_cookie_is_httponly_strict_and_secure_when_configured() -> None:
    c = _console("secure_cookies = true\nsession_lifetime = 900\n")
    with c.client as client:
        page = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        r = client.post("/login", data={"csrf": token.group(1), "login": "boss", "password": "pw-boss"},
                        follow_redirects=False)
        header = next(v for k, v in r.headers.multi_items()
                      if k == "set-cookie" and v.startswith(COOKIE + "="))
        assert "HttpOnly" in header and "SameSite=strict" in header and "Secure" in header
        assert "Max-Age=900" in header


def test_logout_ends_the_session_in_the_store(console: Console) -> None:
    c = console.client
    assert login(c, "boss", "pw-boss") == 303
    token = csrf_of(c)
    assert any(k.startswith("web-session:") for k in console.store.scan(""))
    assert c.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert not any(k.startswith("web-session:") for k in console.store.scan(""))


def test_the_password_is_not_stored_in_the_clear(console: Console) -> None:
    assert login(console.client, "boss", "pw-boss") == 303
    values = [console.store.get(k) or "" for k in console.store.scan("")]
    assert values and not any("pw-boss" in v for v in values)


def test_failed_logins_lock_the_account_for_the_window() -> None:
    c = _console("login_failures_per_account = 3\nlogin_failures_per_client = 100\nlogin_window = 60\n")
    with c.client as client:
        for _ in range(3):
            assert login(client, "boss", "wrong") == 303
        assert c.gate.attempts == 3
        # The right password is not even tried while the account is locked.
        assert login(client, "boss", "pw-boss") == 429
        assert c.gate.attempts == 3
        # Another account from the same client is not locked.
        assert login(client, "alice@example.com", "pw-alice") == 303
        c.clock.now += 61
        client.cookies.clear()
        assert login(client, "boss", "pw-boss") == 303


def test_failed_logins_lock_the_client_across_accounts() -> None:
    c = _console("login_failures_per_account = 100\nlogin_failures_per_client = 4\nlogin_window = 60\n")
    with c.client as client:
        for i in range(4):
            assert login(client, f"nobody{i}", "wrong") == 303
        assert login(client, "boss", "pw-boss") == 429
        assert c.gate.attempts == 4


def test_the_language_follows_accept_language_and_the_switch(console: Console) -> None:
    c = console.client
    assert "ログイン" in c.get("/login", headers={"Accept-Language": "ja,en;q=0.5"}).text
    assert "Log in" in c.get("/login", headers={"Accept-Language": "en-GB,ja;q=0.3"}).text
    c.get("/lang?to=ja", follow_redirects=False)
    assert "ログイン" in c.get("/login", headers={"Accept-Language": "en"}).text
    assert pick_language("fr, ja;q=0.8, en;q=0.9") == "en"
    assert pick_language("") == "en"


def test_no_password_or_mistyped_login_reaches_the_log(console: Console,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    c = console.client
    assert login(c, "pw-alice-typed-as-login", "pw-boss") == 303
    assert login(c, "boss", "pw-boss") == 303
    token = csrf_of(c)
    c.post("/user/alice@example.com", data={"set:spam_threshold": "4", "csrf": token})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "logged in" in text and "changed" in text
    for secret in ("pw-boss", "pw-alice-typed-as-login", token):
        assert secret not in text


def test_each_tier_opens_only_its_pages() -> None:
    c = _console()
    c.gate.directory.add_domain("example.jp")
    c.gate.directory.add_user("taro@example.jp")
    c.gate.add("desk", "pw-desk", Role.HELPDESK)
    with c.client as client:
        assert login(client, "alice@example.com", "pw-alice") == 303
        for path in ("/dashboard", "/users?q=a", "/domains", "/domain/example.com",
                     "/user/alice@example.com", "/explain?address=bob@example.com"):
            assert client.get(path, follow_redirects=False).status_code == 403, path
        assert client.get("/me/vacation").status_code == 200
        assert client.get("/explain?address=alice@example.com").status_code == 200
        client.cookies.clear()
        assert login(client, "boss", "pw-boss") == 303
        for path in ("/dashboard", "/users?q=a", "/domain/example.jp", "/user/taro@example.jp",
                     "/explain?address=taro@example.jp", "/me/filters"):
            assert client.get(path, follow_redirects=False).status_code == 403, path
        assert client.get("/domain/example.com").status_code == 200
        assert client.get("/user/alice@example.com").status_code == 200
        client.cookies.clear()
        assert login(client, "desk", "pw-desk") == 303
        assert client.get("/quarantine", follow_redirects=False).status_code == 403
        assert client.get("/user/taro@example.jp").status_code == 200
        assert "taro@example.jp" in client.get("/users?q=taro").text
