"""The console in a real browser (Debian's chromium driven by Playwright) against the real
parts: slapd with the sample tree and the shipped ACLs, the milter as its own process, a
Postfix MX with its re-injection smtpd, clamd, spamd, and SMTP sinks as mailbox hosts.

A domain administrator switches spam checking on for a subscriber, ``explain`` shows it
with source ``user`` and the next message to that subscriber is spam-checked; another
domain's administrator gets 403 and a forged POST is refused; a subscriber releases their
quarantined message and it arrives.  Screenshots of the main pages are saved under the
run's tmp directory and copied to ``$TMPDIR/mailwarden-web-screenshots`` (both paths are
printed and written to ``screenshots.txt`` in pytest's base temporary directory).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.clamd import ClamdServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, missing_postfix
from harness.slapd import SlapdServer, mailwarden_database
from harness.smtpsink import SinkMessage, SmtpSink
from harness.spamd import GTUBE, SpamdServer
from harness.web import WebConsole
from mailwarden.audit import AuditRecord
from mailwarden.audit import read as read_audit
from mailwarden.config import parse_config
from mailwarden.ldapdir import LdapDirectory
from tests.milter.conftest import MilterProcess, archive_section, base_sections, milter_behind_mx

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.e2e, pytest.mark.slapd,
    pytest.mark.skipif(missing_postfix() is not None, reason=str(missing_postfix())),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium"),
]

DATA = Path(__file__).parent / "data"
ROOT_DN = "cn=admin,dc=mailwarden,dc=test"


@dataclass
class Stack:
    slapd: SlapdServer
    mx: PostfixInstance
    milter: MilterProcess
    mailbox: SmtpSink
    web: WebConsole
    shots: Path

    def wait_for(self, address: str, subject: str, timeout: float = 20.0) -> SinkMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.mailbox.messages_for(address):
                if m.header("Subject") == subject:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no message {subject!r} for {address}; milter log:\n"
                             f"{self.milter.log()[-3000:]}")

    def manager(self) -> LdapDirectory:
        """The directory bound as its manager (reads everything)."""
        cfg = parse_config(f'[ldap]\nuri = "{self.slapd.uri}"\nbind_dn = "{ROOT_DN}"\n'
                           'bind_password = "secret"\n')
        return LdapDirectory(cfg.ldap)

    def entry(self, dn: str) -> dict[str, list[str]]:
        """``dn``'s values as the directory's manager reads them."""
        return {k: list(v) for k, v in self.manager().read_entry(dn).values.items()}

    def audit(self, domain: str) -> list[AuditRecord]:
        """The domain's audit records as the directory's manager reads them."""
        return read_audit(self.manager(), domain=domain)


@pytest.fixture(scope="module")
def stack(clamd: ClamdServer, spamd: SpamdServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    shots = tmp_path_factory.mktemp("screenshots")
    work = Path(tempfile.mkdtemp(prefix="mw-web-e2e-"))
    work.chmod(0o755)
    slapd = SlapdServer([mailwarden_database(DATA / "web.ldif")]).start()
    metrics_port = free_port()
    try:
        with SmtpSink() as mailbox, SmtpSink(lmtp=True) as archive:
            sections = (base_sections(ldap_uri=slapd.uri, store_path=work / "state.sqlite3")
                        # A change shows in the milter within a second (the default caches 60 s).
                        + "[policy]\ncache_ttl = 1\nnegative_cache_ttl = 1\ndomain_cache_ttl = 1\n"
                        + archive_section(archive.port))
            milter, mx = milter_behind_mx(
                work, sections, f'metrics_listen = "127.0.0.1:{metrics_port}"', relayhost=mailbox.relayhost,
                myhostname="mx.example.com", clamd=clamd.unix_address, spamd=spamd.address)
            # The console reads the milter's own configuration: the same store, quarantine
            # directory and re-injection smtpd.
            web = WebConsole(milter.config_path.read_text(),
                             f'cluster_metrics_urls = ["http://127.0.0.1:{metrics_port}/metrics"]\n'
                             "dashboard_refresh = 1\n", workdir=work / "web").start()
            try:
                yield Stack(slapd, mx, milter, mailbox, web, shots)
            finally:
                web.stop()
                mx.cleanup()
                milter.stop()
                # pytest keeps only its last few base directories: a copy outlives them.
                copy = Path(tempfile.gettempdir()) / "mailwarden-web-screenshots"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(shots, copy)
                (tmp_path_factory.getbasetemp() / "screenshots.txt").write_text(f"{shots}\n{copy}\n")
                print(f"\nweb console screenshots: {shots} (copy: {copy})")
                if "Traceback" in web.log():
                    print(web.log()[-3000:])
    finally:
        slapd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def new_page(browser: object, stack: Stack, login: str, password: str = "secret", locale: str = "en-GB"):  # type: ignore[no-untyped-def]
    context = browser.new_context(locale=locale, viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(stack.web.url + "/login")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.click("#login")
    page.wait_for_load_state()
    assert "/login" not in page.url, page.content()[:2000]
    return page


def shot(page: object, stack: Stack, name: str) -> None:
    page.screenshot(path=str(stack.shots / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def message(subject: str, body: str = "Hello, see you tomorrow.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "someone@remote.example"
    msg["To"] = "x@example.com"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def test_a_domain_admin_switches_spam_checking_on_and_mail_is_then_spam_checked(
        stack: Stack, browser: object) -> None:
    # Before: bob has no spam check, so spam reaches him unmarked.
    result = stack.mx.send("someone@remote.example", ["bob@example.com"], message("offer 1", GTUBE + "\n"))
    assert result.accepted, stack.milter.log()[-3000:]
    copy = stack.wait_for("bob@example.com", "offer 1")
    assert copy.header("X-Spam-Flag") is None and copy.header("X-Spam-Status") is None
    page = new_page(browser, stack, "com-admin")
    # One domain: the domain's page is the home page.
    assert page.url.endswith("/domain/example.com")
    assert page.locator("#users").inner_text().count("@example.com") >= 3
    shot(page, stack, "domain-admin-domain")
    page.goto(stack.web.url + "/user/bob@example.com")
    row = page.locator("#service-spam_check")
    assert row.locator(".state").inner_text() == "off"
    shot(page, stack, "domain-admin-user-before")
    page.click("button[value=spam_check-enable]")
    page.wait_for_load_state()
    assert page.locator("#message").inner_text() == "Saved."
    assert page.locator("#service-spam_check .state").inner_text() == "on"
    shot(page, stack, "domain-admin-user-after")
    # The domain's administrator gives bob an alias.
    page.fill("#alias-form textarea", "robert@example.com")
    page.click("#alias-save")
    page.wait_for_load_state()
    assert page.locator("#user-aliases").inner_text() == "robert@example.com"
    # explain in the browser: on, and from the user's own entry.
    page.goto(stack.web.url + "/explain?address=bob@example.com")
    assert page.locator("#explain-spam_check .state").inner_text() == "on"
    assert page.locator("#explain-spam_check .source").inner_text() == "user"
    shot(page, stack, "explain")
    # The directory holds it (read back as the manager), and the change was audited.
    records = [r for r in stack.audit("example.com") if r.target.startswith("uid=bob,")]
    assert records and records[-1].actor == "com-admin" and records[-1].origin == "web 127.0.0.1"
    assert records[-1].creator.lower() == "uid=com-admin,ou=admins,dc=mailwarden,dc=test"
    bob = stack.entry("uid=bob,ou=users,mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test")
    assert "spam-check" in [v.lower() for v in bob["enabled_service"]]
    assert "spam-check" not in [v.lower() for v in bob.get("disabled_service", [])]
    assert bob["alternate_address"] == ["robert@example.com"]
    # End to end: the same spam to bob is now spam-checked (GTUBE scores over the reject score).
    time.sleep(1.2)  # the milter's policy cache (1 s here)
    result = stack.mx.send("someone@remote.example", ["bob@example.com"], message("offer 2", GTUBE + "\n"))
    assert not result.accepted and result.data is not None
    assert result.data[0] == 550 and "spam (score" in result.data[1], result
    assert "bob@example.com=reject[spam" in stack.milter.log()


def test_another_domains_admin_gets_403_and_a_forged_post_is_refused(stack: Stack, browser: object) -> None:
    bob_dn = "uid=bob,ou=users,mwDomainName=example.com,ou=domains,dc=mailwarden,dc=test"
    before = stack.entry(bob_dn)
    page = new_page(browser, stack, "jp-admin")
    response = page.goto(stack.web.url + "/user/bob@example.com")
    assert response is not None and response.status == 403
    shot(page, stack, "other-domain-403")
    # A POST with the person's own valid CSRF token but another domain's user: 403.
    page.goto(stack.web.url + "/explain")
    token = page.locator("header input[name=csrf]").get_attribute("value")
    assert token
    forged = page.request.post(stack.web.url + "/user/bob@example.com",
                               form={"csrf": token, "service": "spam_check", "action": "disable"})
    assert forged.status == 403
    # Without a token: 403 as well.
    forged = page.request.post(stack.web.url + "/user/bob@example.com",
                               form={"service": "spam_check", "action": "disable"})
    assert forged.status == 403
    assert stack.entry(bob_dn) == before
    # explain of another domain's address: 403 too.
    assert page.goto(stack.web.url + "/explain?address=bob@example.com").status == 403  # type: ignore[union-attr]


def test_a_subscriber_releases_their_quarantined_message_and_it_arrives(
        stack: Stack, browser: object) -> None:
    since = len(stack.milter.log())
    result = stack.mx.send("someone@remote.example", ["kept@example.com"], message("hold-for-review 1"))
    assert result.accepted
    held_line = stack.milter.wait_for_log("quarantine=", since=since)
    entry_id = re.search(r"quarantine=(\S+)", held_line)
    assert entry_id, held_line
    assert not stack.mailbox.messages_for("kept@example.com")
    page = new_page(browser, stack, "kept@example.com", locale="ja-JP")
    assert page.url.endswith("/me/filters")
    assert "マイフィルタ" in page.locator("h1").inner_text()
    shot(page, stack, "end-user-filters-ja")
    page.click("text=隔離メール")
    page.wait_for_load_state()
    row = page.locator(f"#held-{entry_id.group(1).rstrip(',;')}")
    assert "hold-for-review 1" in row.inner_text()
    shot(page, stack, "end-user-quarantine-ja")
    row.locator("button.release").click()
    page.wait_for_load_state()
    assert page.locator("#message").inner_text() == "解放しました。メールを配送します。"
    copy = stack.wait_for("kept@example.com", "hold-for-review 1")
    assert copy.recipients == ("kept@example.com",)
    assert page.locator("#empty").is_visible()
    # Another subscriber does not see (nor release) it: a second message, bob's view.
    result = stack.mx.send("someone@remote.example", ["kept@example.com"], message("hold-for-review 2"))
    assert result.accepted
    stack.milter.wait_for_log("quarantine=", since=len(held_line) + since)
    other = new_page(browser, stack, "bob@example.com")
    other.goto(stack.web.url + "/quarantine")
    assert "hold-for-review 2" not in other.content()
    # The domain's administrator sees it, and deletes it.
    admin = new_page(browser, stack, "com-admin")
    admin.goto(stack.web.url + "/quarantine")
    held = admin.locator("#held tr", has_text="hold-for-review 2")
    assert held.count() == 1
    shot(admin, stack, "domain-admin-quarantine")
    held.locator("button.delete").click()
    admin.wait_for_load_state()
    assert admin.locator("#message").inner_text() == "Deleted."


def test_system_admin_and_helpdesk_pages(stack: Stack, browser: object) -> None:
    # Some traffic for the charts.
    stack.mx.send("someone@remote.example", ["alice@example.com"], message("for the charts"))
    root = new_page(browser, stack, "root")
    assert root.url.endswith("/dashboard")
    chart = root.request.get(stack.web.url + "/chart/node/rates.svg")
    assert chart.status == 200 and chart.headers["content-type"].startswith("image/svg+xml")
    time.sleep(1.2)
    chart = root.request.get(stack.web.url + "/chart/node/rates.svg").text()
    assert "milter_messages:accept" in chart, chart[:500]
    root.reload()
    root.wait_for_timeout(2500)  # the page's refresh script reloads the charts
    shot(root, stack, "system-admin-dashboard")
    root.goto(stack.web.url + "/domains")
    listed = set(root.locator("#domains").inner_text().split())
    assert {"example.com", "example.jp", "lab.example.org"} <= listed
    shot(root, stack, "system-admin-domains")
    desk = new_page(browser, stack, "desk")
    desk.goto(stack.web.url + "/users?q=example.jp")
    assert "taro@example.jp" in desk.locator("#users").inner_text()
    shot(desk, stack, "helpdesk-users")
    assert desk.goto(stack.web.url + "/domain/example.com").status == 200  # type: ignore[union-attr]
