"""The web console: a server-rendered ASGI application (Starlette, Jinja2 pages).

It is thin like the CLI: each page asks the core (the effective policy, the catalogue) and
the directory, bound as the person logged in.  What a person may see or change is decided
twice: here, so that pages offer only what the tier allows (a domain administrator never
opens another domain's page: 403), and by slapd, which refuses whatever the person's bind
may not do, whatever the console shows.  Quarantined mail is not in the directory, so the
console alone decides it (:func:`mailwarden.web.quarantine.visible`).

Blocking work (LDAP, /metrics scrapes, the quarantine's files and re-injection) runs in
Starlette's one thread pool; the session and throttle store is awaited.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from mailwarden import catalogue
from mailwarden.access import (
    AuthenticationFailed,
    ChangeRefused,
    Person,
    Role,
    delegated_services,
    may_edit,
    service_changes,
)
from mailwarden.address import InvalidAddress, normalize_address, normalize_domain
from mailwarden.catalogue import Service
from mailwarden.cli.common import policy_as_dict, show_value
from mailwarden.config import Config
from mailwarden.directory import Directory, DirectoryError, DirectoryUnavailable, Entry, NoSuchEntry
from mailwarden.policy import AddressKind, EffectivePolicy, PolicyResolver
from mailwarden.store import AsyncStore, StoreUnavailable
from mailwarden.web.charts import Dashboard
from mailwarden.web.config import WebConfig
from mailwarden.web.gate import Gate
from mailwarden.web.i18n import LANGUAGES, pick_language, translator
from mailwarden.web.quarantine import Held, NotHeld, Quarantine, QuarantineError, visible
from mailwarden.web.security import COOKIE, LoginThrottle, Session, Sessions, csrf_ok

log = logging.getLogger("mailwarden.web")

TEMPLATES = Path(__file__).with_name("templates")
LANG_COOKIE = "mw_lang"
PRELOGIN_COOKIE = "mw_prelogin"
ADMINS = (Role.SYSTEM_ADMIN, Role.HELPDESK)

# The end user's pages: which settings each shows (the catalogue and the domain decide
# which of them the person may change: access.may_edit).
SELF_SERVICE = {
    "filters": ("spam_threshold", "spam_action", "keyword_rules", "sender_allowlist", "sender_blocklist"),
    "forwarding": ("forward_addresses", "forward_keep_copy"),
    "vacation": ("vacation_active", "vacation_subject", "vacation_text"),
}
# Addresses that are not settings but are the administrators' to change: a user's aliases
# (alternate addresses) and a domain's aliases (slapd lets domain administrators write both).
ALIASES: dict[str, tuple[str, Callable[[str], str]]] = {
    "user": ("alternate_address", normalize_address),
    "domain": ("domain_alias", normalize_domain),
}
# The domain page: the domain's notice settings apart from the rest.
NOTICE_SETTINGS = ("notice_template", "notice_language", "notice_recipients", "admin_address")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

REFRESH_JS = """\
// Reload the dashboard's charts every data-refresh seconds (no page reload).
(function () {
  var secs = Number(document.body.getAttribute("data-refresh")) || 5;
  setInterval(function () {
    document.querySelectorAll("img.chart").forEach(function (img) {
      img.src = img.src.split("?")[0] + "?t=" + Date.now();
    });
  }, secs * 1000);
})();
"""


@dataclass
class Services:
    """What the console is built from (the real ones by :func:`build`, fakes in tests)."""

    config: Config
    gate: Gate
    store: AsyncStore
    secret: bytes
    quarantine: Quarantine | None = None
    dashboard: Dashboard | None = None
    clock: Callable[[], float] = time.time


@dataclass
class Ctx:
    """One logged-in request: the session, the person and their bound directory."""

    request: Request
    session: Session
    person: Person
    directory: Directory
    words: dict[str, str]

    @property
    def client(self) -> str:
        return self.request.client.host if self.request.client else "-"


def person_of(session: Session) -> Person:
    """The person a session was opened for."""
    return Person(login=session.login, dn=session.dn, role=Role(session.role), domains=session.domains,
                  address=session.address or None, domain=session.domain or None)


class Console:
    """The routes and what they share."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.web = WebConfig.of(services.config)
        self.sessions = Sessions(services.store, services.secret, self.web.session_lifetime,
                                 clock=services.clock)
        self.throttle = LoginThrottle(services.store, per_account=self.web.login_failures_per_account,
                                      per_client=self.web.login_failures_per_client,
                                      window=self.web.login_window)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
        self.templates = Jinja2Templates(env=env)
        self.templates.env.globals["show"] = show_value

    # ------------------------------------------------------------ plumbing

    def language(self, request: Request, session: Session | None = None) -> str:
        """The chosen language: session, cookie, Accept-Language."""
        if session is not None and session.lang in LANGUAGES:
            return session.lang
        chosen = request.cookies.get(LANG_COOKIE, "")
        if chosen in LANGUAGES:
            return chosen
        return pick_language(request.headers.get("accept-language", ""))

    def page(self, request: Request, name: str, ctx: Ctx | None, status: int = 200,
             **values: Any) -> Response:
        """Render a template with the words, the person and the CSRF token."""
        lang = self.language(request, ctx.session if ctx else None)
        words = translator(lang)
        data = {"t": words, "lang": lang, "ctx": ctx, "person": ctx.person if ctx else None,
                "csrf": ctx.session.csrf if ctx else "", "Role": Role, "path": request.url.path,
                "query": quote(request.url.query or "", safe="=&"), **values}
        response = self.templates.TemplateResponse(request, name, data, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def cookie_args(self) -> dict[str, Any]:
        return {"httponly": True, "secure": self.web.secure_cookies, "samesite": "strict", "path": "/"}

    async def context(self, request: Request) -> Ctx:
        """The logged-in request, or a redirect to the login page (HTTPException 303)."""
        session = await self.sessions.find(request.cookies.get(COOKIE))
        if session is None:
            raise HTTPException(303, headers={"Location": "/login"})
        person = person_of(session)
        try:
            password = self.sessions.password(session)
            directory = await run_in_threadpool(self.s.gate.bind, person, password)
        except (ValueError, AuthenticationFailed):
            # The password changed in the directory, or the key did: log in again.
            await self.sessions.end(session.id)
            raise HTTPException(303, headers={"Location": "/login"}) from None
        # Unbound when the response is ready (see create_app's route()).
        request.state.directories = [*getattr(request.state, "directories", []), directory]
        return Ctx(request, session, person, directory, translator(self.language(request, session)))

    async def change_form(self, request: Request) -> tuple[Ctx, dict[str, Any]]:
        """A POST's context and form, after its CSRF token is checked (403 without it)."""
        ctx = await self.context(request)
        form = await request.form()
        if not csrf_ok(ctx.session.csrf, form.get("csrf")):
            log.warning("web: refused a change without a valid CSRF token: %s %s by %s from %s",
                        request.method, request.url.path, ctx.person.login, ctx.client)
            raise HTTPException(403, "missing or wrong CSRF token")
        return ctx, {k: form.getlist(k) for k in form if k != "csrf"}

    def resolver(self, ctx: Ctx) -> PolicyResolver:
        """A resolver that reads through the person's bind (no cache: every page reads anew)."""
        return PolicyResolver(ctx.directory, self.s.config)

    def in_scope(self, person: Person, domain: str | None, address: str | None = None) -> bool:
        """Whether the tier lets ``person`` open pages of ``domain`` (and ``address``)."""
        if person.role in ADMINS:
            return True
        if person.role is Role.DOMAIN_ADMIN:
            return domain is not None and domain in person.domains
        return address is not None and address == person.address

    def owns_recipient(self, ctx: Ctx) -> Callable[[str], bool]:
        """Whether a quarantined message's recipient is the person's to release (blocking).

        The recipient is resolved through the person's bind, like a page of theirs: an alias
        or a domain alias counts as the address it stands for, and what slapd does not let
        the person read is not theirs.
        """
        person = ctx.person
        resolver = self.resolver(ctx)
        resolver_cache: dict[str, bool] = {}

        def owns(recipient: str) -> bool:
            if person.role is Role.SYSTEM_ADMIN:
                return True
            if person.role is Role.HELPDESK:
                return False
            if recipient not in resolver_cache:
                try:
                    policy = resolver.effective_policy(recipient)
                except InvalidAddress:
                    resolver_cache[recipient] = False
                else:
                    resolver_cache[recipient] = (policy.kind is AddressKind.SUBSCRIBER
                                                 and self.in_scope(person, policy.domain, policy.canonical))
            return resolver_cache[recipient]
        return owns

    # ------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        response = self.page(request, "login.html", None, prelogin=token, error=request.query_params.get("e"))
        response.set_cookie(PRELOGIN_COOKIE, token, max_age=3600, **self.cookie_args())
        if "lang" in request.query_params and request.query_params["lang"] in LANGUAGES:
            response.set_cookie(LANG_COOKIE, request.query_params["lang"], max_age=365 * 86400,
                                **self.cookie_args())
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_ok(request.cookies.get(PRELOGIN_COOKIE, ""), form.get("csrf")):
            raise HTTPException(403, "missing or wrong CSRF token")
        login = str(form.get("login", "")).strip()
        password = str(form.get("password", ""))
        client = request.client.host if request.client else "-"
        if not login or not password or len(login) > 256 or len(password) > 1024:
            return RedirectResponse("/login?e=login_failed", 303)
        try:
            why = await self.throttle.refused(login, client)
        except StoreUnavailable as exc:
            log.error("web: store unavailable, logins refused: %s", exc)
            return RedirectResponse("/login?e=unavailable", 303)
        if why:
            log.warning("web: login refused: too many failures for this %s (client %s)", why, client)
            return self.page(request, "login.html", None, status=429, prelogin=request.cookies.get(
                PRELOGIN_COOKIE, ""), error="throttled")
        try:
            person = await run_in_threadpool(self.s.gate.authenticate, login, password)
        except AuthenticationFailed:
            await self.throttle.failed(login, client)
            # The login as typed may be a password typed in the wrong field: not logged.
            log.info("web: login failed from %s", client)
            return RedirectResponse("/login?e=login_failed", 303)
        except DirectoryUnavailable as exc:
            log.error("web: directory unavailable at login: %s", exc)
            return RedirectResponse("/login?e=unavailable", 303)
        await self.throttle.succeeded(login)
        lang = request.cookies.get(LANG_COOKIE, "")
        session = await self.sessions.create(
            login=person.login, dn=person.dn, role=person.role.value, domains=tuple(person.domains),
            address=person.address or "", domain=person.domain or "", password=password,
            lang=lang if lang in LANGUAGES else "",
        )
        log.info("web: %s (%s) logged in from %s", person.login, person.role.value, client)
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, session.id, max_age=int(self.web.session_lifetime), **self.cookie_args())
        response.delete_cookie(PRELOGIN_COOKIE, path="/")
        return response

    async def logout(self, request: Request) -> Response:
        ctx, _ = await self.change_form(request)
        await self.sessions.end(ctx.session.id)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def language_switch(self, request: Request) -> Response:
        """``/lang?to=ja``: remember the language (cookie, and the session when logged in)."""
        lang = request.query_params.get("to", "")
        if lang not in LANGUAGES:
            raise HTTPException(400, "unknown language")
        session = await self.sessions.find(request.cookies.get(COOKIE))
        if session is not None:
            await self.sessions.update(dataclasses.replace(session, lang=lang))
        back = request.headers.get("referer", "/")
        target = back if back.startswith(str(request.base_url)) else "/"
        response = RedirectResponse(target, 303)
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 86400, **self.cookie_args())
        return response

    # ------------------------------------------------------------ home and dashboard

    async def home(self, request: Request) -> Response:
        ctx = await self.context(request)
        role = ctx.person.role
        if role is Role.END_USER:
            return RedirectResponse("/me/filters", 303)
        if role is Role.DOMAIN_ADMIN and len(ctx.person.domains) == 1:
            return RedirectResponse(f"/domain/{ctx.person.domains[0]}", 303)
        if role is Role.DOMAIN_ADMIN:
            return self.page(request, "domains.html", ctx, domains=list(ctx.person.domains))
        return RedirectResponse("/dashboard", 303)

    async def dashboard(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role not in ADMINS:
            raise HTTPException(403)
        return self.page(request, "dashboard.html", ctx, refresh=self.web.dashboard_refresh)

    async def chart(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role not in ADMINS or self.s.dashboard is None:
            raise HTTPException(403)
        scope, kind = request.path_params["scope"], request.path_params["kind"]
        if scope not in ("node", "cluster") or kind not in ("rates", "latency"):
            raise HTTPException(404)
        await run_in_threadpool(self.s.dashboard.refresh)
        title = f"{ctx.words[scope]}: {ctx.words[kind]}"
        svg = self.s.dashboard.svg(scope, kind, title=title)
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def refresh_js(self, request: Request) -> Response:
        return Response(REFRESH_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    # ------------------------------------------------------------ domains (system admin)

    async def domains(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role is Role.DOMAIN_ADMIN:
            return self.page(request, "domains.html", ctx, domains=list(ctx.person.domains))
        if ctx.person.role not in ADMINS:
            raise HTTPException(403)
        names = await run_in_threadpool(self.s.gate.domains, ctx.directory)
        return self.page(request, "domains.html", ctx, domains=names)

    async def _domain_policy(self, ctx: Ctx, name: str) -> tuple[Entry, EffectivePolicy]:
        try:
            domain = normalize_domain(name)
        except InvalidAddress:
            raise HTTPException(404) from None
        entry = await run_in_threadpool(ctx.directory.find_domain, domain)
        canonical = (entry.first("domain_name") or domain).lower() if entry else domain
        if not self.in_scope(ctx.person, canonical) or ctx.person.role is Role.END_USER:
            raise HTTPException(403)
        if entry is None:
            raise HTTPException(404)
        resolver = self.resolver(ctx)
        policy = await run_in_threadpool(resolver.build, canonical, entry, None)
        return entry, dataclasses.replace(policy, kind=AddressKind.DOMAIN)

    async def domain(self, request: Request) -> Response:
        ctx = await self.context(request)
        entry, policy = await self._domain_policy(ctx, request.path_params["name"])
        assert policy.address is not None
        text = request.query_params.get("q", "")
        users = await run_in_threadpool(self.s.gate.users, ctx.directory, entry, text, 500)
        settings = [catalogue.SETTINGS[n] for n in catalogue.SETTINGS
                    if catalogue.SETTINGS[n].scope in ("both", "domain")]
        return self.page(
            request, "domain.html", ctx, entry=entry, policy=policy, users=users, q=text,
            aliases=entry.all("domain_alias"),
            notice_settings=[s for s in settings if s.name in NOTICE_SETTINGS],
            settings=[s for s in settings if s.name not in NOTICE_SETTINGS],
            services=list(catalogue.SERVICES.values()), layer="domain",
            editable=self._editable(ctx.person, "domain", entry),
            own=self._own(entry), target=f"/domain/{policy.address}", message=request.query_params.get("m"),
        )

    # ------------------------------------------------------------ users

    async def users(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role not in ADMINS:
            raise HTTPException(403)
        text = request.query_params.get("q", "").strip()
        found = (await run_in_threadpool(self.s.gate.users, ctx.directory, None, text, 200)) if text else []
        return self.page(request, "users.html", ctx, q=text, users=found)

    async def _user(self, ctx: Ctx, address: str) -> tuple[Entry, Entry, EffectivePolicy]:
        try:
            addr = normalize_address(address)
        except InvalidAddress:
            raise HTTPException(404) from None
        # Resolved through the person's bind (slapd shows only what it may read), then the
        # tier: another domain's address is 403 whether or not the directory showed it.
        policy = await run_in_threadpool(self.resolver(ctx).effective_policy, addr)
        if not self.in_scope(ctx.person, policy.domain, policy.canonical):
            raise HTTPException(403)
        if policy.kind is not AddressKind.SUBSCRIBER or policy.domain is None or policy.canonical is None:
            raise HTTPException(404)
        domain = await run_in_threadpool(ctx.directory.find_domain, policy.domain)
        user = await run_in_threadpool(ctx.directory.find_user, policy.canonical, domain) if domain else None
        if domain is None or user is None:
            raise HTTPException(404)
        return domain, user, policy

    async def user(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role is Role.END_USER:
            raise HTTPException(403)
        domain, user, policy = await self._user(ctx, request.path_params["address"])
        settings = [s for s in catalogue.SETTINGS.values() if s.scope in ("both", "user")]
        return self.page(
            request, "user.html", ctx, entry=user, policy=policy, settings=settings,
            services=list(catalogue.SERVICES.values()), layer="user",
            editable=self._editable(ctx.person, "user", domain), own=self._own(user),
            target=f"/user/{policy.canonical}", message=request.query_params.get("m"),
        )

    def _editable(self, person: Person, layer: str, domain: Entry | None) -> dict[str, bool]:
        """Which fields and service switches the page offers (a hint: slapd and the write path
        decide).  A domain administrator switches only the services delegated to the domain."""
        names = [*catalogue.SETTINGS, "enabled_service"]
        out = {n: may_edit(person, n, layer=layer, domain=domain) for n in names}
        out["aliases"] = person.role in (Role.SYSTEM_ADMIN, Role.DOMAIN_ADMIN)
        delegated = delegated_services(domain) if person.role is Role.DOMAIN_ADMIN else None
        for service in catalogue.SERVICES:
            out[f"service:{service.value}"] = out["enabled_service"] and (
                delegated is None or service.value in delegated)
        return out

    @staticmethod
    def _own(entry: Entry) -> dict[str, str]:
        """The entry's own stored values (one per line), for the edit fields."""
        names = [*catalogue.SETTINGS, "alternate_address", "domain_alias"]
        return {name: "\n".join(entry.all(name)) for name in names}

    # ------------------------------------------------------------ changes

    async def _write(self, ctx: Ctx, dn: str, changes: dict[str, list[str]], back: str) -> Response:
        try:
            await run_in_threadpool(self.s.gate.write, ctx.directory, ctx.person, dn, changes, ctx.client)
        except ChangeRefused as exc:
            log.warning("web: %s: change of %s refused: %s", ctx.person.login, dn, exc)
            return self.page(ctx.request, "error.html", ctx, status=403,
                             message=f"{ctx.words['refused']} {exc}")
        except NoSuchEntry:
            raise HTTPException(404) from None
        except DirectoryError as exc:
            return self.page(ctx.request, "error.html", ctx, status=400,
                             message=f"{ctx.words['refused']} {exc}")
        log.info("web: %s changed %s: %s", ctx.person.login, dn, ", ".join(sorted(changes)))
        return RedirectResponse(f"{back}?m=saved", 303)

    def _setting_changes(self, form: dict[str, Any], layer: str, allowed: tuple[str, ...] | None,
                         own: Entry) -> dict[str, list[str]]:
        """Changed settings from a form: ``set:NAME`` fields (a list one per line, empty: unset)."""
        changes: dict[str, list[str]] = {}
        for key, values in form.items():
            if not key.startswith("set:"):
                continue
            name = key[4:]
            concept, normalize = ALIASES[layer]
            if name == concept and allowed is None:
                text = str(values[0]) if values else ""
                try:
                    given = [normalize(v.strip()) for v in text.replace("\r", "").split("\n") if v.strip()]
                except InvalidAddress as exc:
                    raise catalogue.InvalidValue(f"{name}: {exc}") from None
                if sorted(given) != sorted(v.lower() for v in own.all(name)):
                    changes[name] = given
                continue
            spec = catalogue.SETTINGS.get(name)
            outside = allowed is not None and name not in allowed
            if spec is None or spec.scope not in ("both", layer) or outside:
                raise HTTPException(400, f"unknown setting {name}")
            text = str(values[0]) if values else ""
            lines = text.replace("\r", "").split("\n") if spec.multi else [text]
            raw = [line.strip() for line in lines]
            raw = [r for r in raw if r]
            if raw == own.all(name) or (not raw and not own.all(name)):
                continue
            changes[name] = spec.format(spec.parse(raw)) if raw else []
        return changes

    async def user_change(self, request: Request) -> Response:
        ctx, form = await self.change_form(request)
        if ctx.person.role is Role.END_USER:
            raise HTTPException(403)
        _, user, policy = await self._user(ctx, request.path_params["address"])
        return await self._apply(ctx, form, entry=user, policy=policy, layer="user",
                                 back=f"/user/{policy.canonical}", allowed=None)

    async def domain_change(self, request: Request) -> Response:
        ctx, form = await self.change_form(request)
        entry, policy = await self._domain_policy(ctx, request.path_params["name"])
        return await self._apply(ctx, form, entry=entry, policy=policy, layer="domain",
                                 back=f"/domain/{policy.address}", allowed=None)

    async def _apply(self, ctx: Ctx, form: dict[str, Any], *, entry: Entry, policy: EffectivePolicy,
                     layer: str, back: str, allowed: tuple[str, ...] | None) -> Response:
        try:
            if "service" in form:
                action = str(form.get("action", [""])[0])
                if action not in ("enable", "disable", "inherit"):
                    raise HTTPException(400, "unknown action")
                service = Service.parse(str(form["service"][0]))
                changes = service_changes(self.s.config.ldap.mapping, entry, lambda: policy,
                                          [(service, action)])
            else:
                changes = self._setting_changes(form, layer, allowed, entry)
        except (ValueError, catalogue.InvalidValue) as exc:
            return self.page(ctx.request, "error.html", ctx, status=400, message=str(exc))
        if not changes:
            return RedirectResponse(f"{back}?m=saved", 303)
        return await self._write(ctx, entry.dn, changes, back)

    # ------------------------------------------------------------ the end user's pages

    async def me(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role is not Role.END_USER or not ctx.person.address:
            raise HTTPException(403)
        tab = request.path_params["tab"]
        if tab not in SELF_SERVICE:
            raise HTTPException(404)
        domain, user, policy = await self._user(ctx, ctx.person.address)
        settings = [catalogue.SETTINGS[n] for n in SELF_SERVICE[tab]]
        return self.page(request, "me.html", ctx, tab=tab, entry=user, policy=policy, settings=settings,
                         editable=self._editable(ctx.person, "user", domain), own=self._own(user),
                         target=f"/me/{tab}", message=request.query_params.get("m"))

    async def me_change(self, request: Request) -> Response:
        ctx, form = await self.change_form(request)
        if ctx.person.role is not Role.END_USER or not ctx.person.address:
            raise HTTPException(403)
        tab = request.path_params["tab"]
        if tab not in SELF_SERVICE or "service" in form:
            raise HTTPException(400)
        _, user, policy = await self._user(ctx, ctx.person.address)
        return await self._apply(ctx, form, entry=user, policy=policy, layer="user", back=f"/me/{tab}",
                                 allowed=SELF_SERVICE[tab])

    # ------------------------------------------------------------ quarantine

    def _held(self, ctx: Ctx) -> list[Held]:
        if self.s.quarantine is None:
            return []
        return visible(self.s.quarantine.held(), self.owns_recipient(ctx))

    async def quarantine(self, request: Request) -> Response:
        ctx = await self.context(request)
        if ctx.person.role is Role.HELPDESK:
            raise HTTPException(403)
        try:
            held = await run_in_threadpool(self._held, ctx)
        except QuarantineError as exc:
            return self.page(request, "error.html", ctx, status=503, message=str(exc))
        return self.page(request, "quarantine.html", ctx, held=held, available=self.s.quarantine is not None,
                         message=request.query_params.get("m"), now=self.s.clock())

    async def quarantine_change(self, request: Request) -> Response:
        ctx, _ = await self.change_form(request)
        if ctx.person.role is Role.HELPDESK or self.s.quarantine is None:
            raise HTTPException(403)
        entry_id, action = request.path_params["id"], request.path_params["action"]
        quarantine = self.s.quarantine
        try:
            held = await run_in_threadpool(quarantine.get, entry_id)
            mine = await run_in_threadpool(visible, [held], self.owns_recipient(ctx))
            if not mine:
                raise HTTPException(403)
            # Every recipient the person's: the whole message; else their part of it.
            only = None if mine[0].recipients == held.recipients else mine[0].recipients
            if action == "release":
                queue_id = await run_in_threadpool(quarantine.release, entry_id, only)
                log.info("web: %s released quarantined %s from %s, queued as %s",
                         ctx.person.login, entry_id, ctx.client, queue_id)
            elif action == "delete":
                await run_in_threadpool(quarantine.delete, entry_id, only)
                log.info("web: %s deleted quarantined %s from %s", ctx.person.login, entry_id, ctx.client)
            else:
                raise HTTPException(404)
        except NotHeld:
            raise HTTPException(404) from None
        except QuarantineError as exc:
            log.warning("web: quarantine %s of %s failed: %s", action, entry_id, exc)
            return self.page(request, "error.html", ctx, status=503, message=str(exc))
        return RedirectResponse(f"/quarantine?m={'released' if action == 'release' else 'deleted'}", 303)

    # ------------------------------------------------------------ explain

    async def explain(self, request: Request) -> Response:
        ctx = await self.context(request)
        text = request.query_params.get("address", "").strip()
        if not text:
            return self.page(request, "explain.html", ctx, address="", policy=None)
        try:
            address = normalize_address(text)
        except InvalidAddress as exc:
            return self.page(request, "explain.html", ctx, status=400, address=text, policy=None,
                             error=str(exc))
        policy = await run_in_threadpool(self.resolver(ctx).effective_policy, address)
        if not self.in_scope(ctx.person, policy.domain, policy.canonical):
            raise HTTPException(403)
        return self.page(request, "explain.html", ctx, address=address, policy=policy,
                         view=policy_as_dict(policy))

    # ------------------------------------------------------------ errors

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (301, 302, 303) and exc.headers:
            return RedirectResponse(exc.headers["Location"], exc.status_code)
        words = translator(self.language(request))
        known = {403: words["forbidden"], 404: words["not_found"]}
        message = known.get(exc.status_code, words["bad_request"])
        return self.page(request, "error.html", None, status=exc.status_code, message=message)

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        log.error("web: %s %s: %s", request.method, request.url.path, exc)
        words = translator(self.language(request))
        return self.page(request, "error.html", None, status=503, message=words["unavailable"])


def create_app(services: Services) -> Starlette:
    """The console as an ASGI application."""
    c = Console(services)

    def route(path: str, endpoint: Callable[[Request], Awaitable[Response]], post: bool = False) -> Route:
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            finally:
                # The person's connections live for one request (pages are rendered by now).
                for directory in getattr(request.state, "directories", ()):
                    close = getattr(directory, "close", None)
                    if close is not None:
                        await run_in_threadpool(close)

        return Route(path, handle, methods=["POST"] if post else ["GET"])

    routes = [
        route("/login", c.login_page), route("/login", c.login, post=True),
        route("/logout", c.logout, post=True), route("/lang", c.language_switch),
        route("/", c.home), route("/dashboard", c.dashboard),
        route("/chart/{scope}/{kind}.svg", c.chart), route("/refresh.js", c.refresh_js),
        route("/domains", c.domains),
        route("/domain/{name}", c.domain), route("/domain/{name}", c.domain_change, post=True),
        route("/users", c.users),
        route("/user/{address}", c.user), route("/user/{address}", c.user_change, post=True),
        route("/me/{tab}", c.me), route("/me/{tab}", c.me_change, post=True),
        route("/quarantine", c.quarantine),
        route("/quarantine/{id}/{action}", c.quarantine_change, post=True),
        route("/explain", c.explain),
        route("/healthz", _healthz),
    ]
    return Starlette(routes=routes, exception_handlers={
        HTTPException: c.http_error, DirectoryUnavailable: c.unavailable, StoreUnavailable: c.unavailable,
    })


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def build(config: Config) -> Starlette:
    """The console of ``config``: the LDAP gate, the shared store, the milter's quarantine,
    the dashboard's /metrics URLs."""
    from mailwarden.store import async_store_of
    from mailwarden.web.gate import LdapGate
    from mailwarden.web.quarantine import open_quarantine
    from mailwarden.web.security import read_secret_key

    web = WebConfig.of(config)
    node = web.metrics_urls or [f"http://{listen}/metrics" for section in config.sections.values()
                                if (listen := getattr(section, "metrics_listen", ""))]
    services = Services(
        config=config, gate=LdapGate(config), store=async_store_of(config.store),
        secret=read_secret_key(web.secret_key_file), quarantine=open_quarantine(config),
        dashboard=Dashboard(node, web.cluster_metrics_urls, interval=web.dashboard_refresh),
    )
    return create_app(services)
