"""Sessions, CSRF tokens and login throttling of the web console.

A session lives in the shared store (``web-session:ID``, with the lifetime as its TTL),
so every node behind a load balancer knows it and a logout ends it everywhere.  The
browser holds only the random ID, in an HttpOnly, SameSite=Strict cookie (Secure unless
``web.secure_cookies`` is off).  The session keeps the person's directory password,
encrypted with the console's secret key (Fernet: AES-128-CBC + HMAC-SHA256), because every
request binds to the directory as that person: slapd's ACLs decide, not the console.

Every change is a POST carrying the session's CSRF token; a POST without it, or with
another session's, is refused before anything is read from the form's other fields.

Failed logins are counted per account and per client address in the store (``web-fail:``
keys with ``web.login_window`` as TTL), so the limits hold across nodes; while a limit is
reached, no password is tried against the directory at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from mailwarden.store import AsyncStore

SESSION_PREFIX = "web-session:"
FAIL_PREFIX = "web-fail:"
COOKIE = "mw_session"


@dataclass(frozen=True)
class Session:
    """What the console remembers about a logged-in person."""

    id: str
    login: str
    dn: str
    role: str
    domains: tuple[str, ...]
    address: str
    domain: str
    csrf: str
    created: float
    password_token: str
    lang: str = ""

    def to_json(self) -> str:
        """The store value."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Session:
        """Parse a store value."""
        data = json.loads(text)
        data["domains"] = tuple(data["domains"])
        return cls(**data)


def read_secret_key(path: str) -> bytes:
    """The secret key file's bytes (stripped); OSError or ValueError when unusable."""
    data = Path(path).read_bytes().strip()
    if len(data) < 32:
        raise ValueError(f"{path}: holds {len(data)} bytes, 32 or more are needed")
    return data


class Sessions:
    """Create, find and end sessions in the store."""

    def __init__(self, store: AsyncStore, secret: bytes, lifetime: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lifetime = lifetime
        self.clock = clock
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"mailwarden-web\0" + secret).digest()))

    async def create(self, *, login: str, dn: str, role: str, domains: tuple[str, ...],
                     address: str, domain: str, password: str, lang: str = "") -> Session:
        """A new session (a new ID on every login: no fixation)."""
        session = Session(
            id=secrets.token_urlsafe(32), login=login, dn=dn, role=role, domains=domains,
            address=address, domain=domain, csrf=secrets.token_urlsafe(32), created=self.clock(),
            password_token=self._fernet.encrypt(password.encode("utf-8")).decode("ascii"), lang=lang,
        )
        await self.store.set(SESSION_PREFIX + session.id, session.to_json(), ttl=self.lifetime)
        return session

    async def find(self, session_id: str | None) -> Session | None:
        """The live session with this ID, or None (unknown, ended or past its lifetime)."""
        if not session_id or len(session_id) > 100:
            return None
        value = await self.store.get(SESSION_PREFIX + session_id)
        if value is None:
            return None
        session = Session.from_json(value)
        # The store's TTL ends it too; this holds also when a clock or a copy disagrees.
        if self.clock() - session.created >= self.lifetime:
            await self.end(session_id)
            return None
        return session

    async def update(self, session: Session) -> None:
        """Write back a changed session for the rest of its lifetime."""
        left = self.lifetime - (self.clock() - session.created)
        if left > 0:
            await self.store.set(SESSION_PREFIX + session.id, session.to_json(), ttl=left)

    async def end(self, session_id: str) -> None:
        """Log out."""
        await self.store.delete(SESSION_PREFIX + session_id)

    def password(self, session: Session) -> str:
        """The person's directory password (ValueError when the secret key changed)."""
        try:
            return self._fernet.decrypt(session.password_token.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise ValueError("session written with another secret key") from None


def csrf_ok(expected: str, given: object) -> bool:
    """Whether a submitted CSRF token matches (constant time)."""
    return isinstance(given, str) and bool(given) and hmac.compare_digest(expected, given)


def _digest(text: str) -> str:
    # Logins are not written to the store as given (they may be mistyped passwords).
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class LoginThrottle:
    """Failed-login counters per account and per client address, in the shared store."""

    def __init__(self, store: AsyncStore, *, per_account: int, per_client: int, window: float) -> None:
        self.store = store
        self.per_account = per_account
        self.per_client = per_client
        self.window = window

    def _keys(self, login: str, client: str) -> tuple[str, str]:
        return (FAIL_PREFIX + "account:" + _digest(login.strip().lower()),
                FAIL_PREFIX + "client:" + client)

    async def refused(self, login: str, client: str) -> str:
        """Why a login attempt is refused now without trying it ('' when it may be tried)."""
        account, peer = await self.store.get_many(list(self._keys(login, client)))
        if peer is not None and int(peer) >= self.per_client:
            return "client"
        if account is not None and int(account) >= self.per_account:
            return "account"
        return ""

    async def failed(self, login: str, client: str) -> None:
        """Count a failed attempt."""
        for key in self._keys(login, client):
            await self.store.incr(key, ttl=self.window)

    async def succeeded(self, login: str) -> None:
        """A successful login clears its account's counter (not the client's)."""
        await self.store.delete(self._keys(login, "")[0])
