"""Notices about blocked mail: per-domain, per-language templates, rate-limited, loop-free.

Templates are Jinja2 files ``SET/LANGUAGE/KIND.j2`` (see
``mailwarden/templates/README.md``), searched in the site directory first and
then in the shipped set; they run in Jinja's sandbox because domain
administrators choose the set.  A notice is a plain text/plain UTF-8 mail with
``Auto-Submitted: auto-generated``; the caller sends it with a null envelope
sender.  Each notice address gets at most ``limit`` notices per ``window``
seconds (counted in the shared store, so a cluster counts once); when the store
cannot count, the notice is not sent: an outbreak must not turn into a flood.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import Any

from jinja2 import (
    BaseLoader,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
)
from jinja2.sandbox import SandboxedEnvironment

from mailwarden.logfields import ID_HEADER
from mailwarden.store import Store, StoreUnavailable

log = logging.getLogger("mailwarden.notify")

KINDS = ("virus", "banned", "stripped")
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ACTIONS_JA = {
    "refused": "受信を拒否しました",
    "discarded": "破棄しました",
    "quarantined": "隔離しました",
    "removed": "添付ファイルを削除して配送しました",
}


@dataclass(frozen=True)
class Notice:
    """A notice to send about one recipient's blocked or stripped mail."""

    kind: str
    """``virus`` or ``banned``."""
    to: str
    audience: str
    """``recipient``, ``admin`` or ``sender``."""
    recipient: str
    domain: str
    language: str
    template: str
    reason: str
    names: tuple[str, ...] = ()
    action: str = "refused"
    """``refused``, ``discarded``, ``quarantined`` or ``removed``."""


@dataclass(frozen=True)
class MessageFacts:
    """What a notice may say about the original message."""

    sender: str = ""
    from_header: str = ""
    subject: str = ""
    date: str = ""
    message_id: str = ""
    queue_id: str = ""
    client_address: str = ""
    recipients: tuple[str, ...] = ()
    mwid: str = ""
    """The original's mailwarden id: the notice carries it, so a trace shows the notice."""


class NoticeTemplates:
    """Finds and renders notice templates, site directory first."""

    def __init__(self, site_dir: str | None = None, *, node: str = "") -> None:
        # Separate environments, so a broken site template falls back to the shipped one
        # of the same name instead of shadowing it.
        loaders: list[BaseLoader] = [FileSystemLoader(site_dir)] if site_dir else []
        loaders.append(PackageLoader("mailwarden", "templates"))
        self.envs = [
            SandboxedEnvironment(loader=loader, autoescape=False, undefined=StrictUndefined,
                                 keep_trailing_newline=True)
            for loader in loaders
        ]
        self.node = node

    def render(self, template_set: str, language: str, kind: str, values: Mapping[str, Any]) -> str:
        """Render ``kind``; fall back to language ``en`` and set ``default`` when missing or broken."""
        tried: list[str] = []
        for name in self._candidates(template_set, language, kind):
            tried.append(name)
            for env in self.envs:
                try:
                    return env.get_template(name).render(**values, node=self.node)
                except TemplateNotFound:
                    continue
                except TemplateError as exc:
                    log.warning("notice template %s failed, trying the next: %s", name, exc)
        raise LookupError(f"no usable notice template among {', '.join(tried)}")

    @staticmethod
    def _candidates(template_set: str, language: str, kind: str) -> list[str]:
        sets = [template_set] if _SET_NAME.match(template_set or "") else []
        languages = [language] if _SET_NAME.match(language or "") else []
        out: list[str] = []
        for s in [*sets, "default"]:
            for lang in [*languages, "en"]:
                name = f"{s}/{lang}/{kind}.j2"
                if name not in out:
                    out.append(name)
        return out


def split_subject(text: str) -> tuple[str, str]:
    """A rendered notice as (subject, body): the first line is ``Subject: ...``."""
    first, _, rest = text.partition("\n")
    if first.lower().startswith("subject:"):
        return first.split(":", 1)[1].strip(), rest.lstrip("\n")
    return "Mail notice", text


@dataclass
class Notifier:
    """Renders and sends notices through ``send(to, message_bytes)``, rate-limited per address."""

    templates: NoticeTemplates
    send: Callable[[str, bytes], None]
    store: Store | None = None
    limit: int = 10
    window: int = 3600
    from_pattern: str = "postmaster@{domain}"

    def values(self, notice: Notice, facts: MessageFacts) -> dict[str, Any]:
        """The names a template sees."""
        return {
            "kind": notice.kind, "audience": notice.audience, "action": notice.action,
            "action_ja": ACTIONS_JA.get(notice.action, notice.action),
            "recipient": notice.recipient, "recipients": list(facts.recipients or (notice.recipient,)),
            "domain": notice.domain, "reason": notice.reason, "names": list(notice.names),
            "sender": f"<{facts.sender}>", "from_header": facts.from_header, "subject": facts.subject,
            "date": facts.date, "message_id": facts.message_id, "queue_id": facts.queue_id,
            "client_address": facts.client_address,
        }

    def build(self, notice: Notice, facts: MessageFacts) -> bytes:
        """The notice as a complete message."""
        text = self.templates.render(notice.template, notice.language, notice.kind,
                                     self.values(notice, facts))
        subject, body = split_subject(text)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.from_pattern.replace("{domain}", notice.domain or "localhost")
        msg["To"] = notice.to
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid("mailwarden", notice.domain or None)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Mailwarden-Notice"] = notice.kind
        if facts.mwid:
            msg[ID_HEADER] = facts.mwid
        if facts.message_id:
            msg["References"] = facts.message_id
        msg.set_content(body, charset="utf-8", cte="base64")
        return msg.as_bytes()

    def allowed(self, to: str) -> bool:
        """Count one notice for ``to``; False when over the limit or when counting fails."""
        if self.store is None:
            return True
        try:
            count = self.store.incr(f"notice:{to.lower()}", 1, ttl=float(self.window))
        except StoreUnavailable as exc:
            log.warning("notice to %s not sent: rate limit store unavailable: %s", to, exc)
            return False
        if count > self.limit:
            if count == self.limit + 1:
                log.info("notices to %s rate-limited (%d per %ds)", to, self.limit, self.window)
            return False
        return True

    def notify(self, notice: Notice, facts: MessageFacts) -> str:
        """Send one notice; returns ``sent``, ``limited`` or ``failed: why`` (never raises)."""
        if not self.allowed(notice.to):
            return "limited"
        try:
            data = self.build(notice, facts)
            self.send(notice.to, data)
        except Exception as exc:  # noqa: BLE001 (a notice must never change the fate of the mail)
            return f"failed: {exc}"
        return "sent"


NOTICE_RESULTS = ("sent", "limited", "failed", "dropped")


class NoticeOutbox:
    """Sends notices from a thread of its own, so that no SMTP reply waits for one.

    The milter posts a message's notices once its verdict is carried out and answers
    the MTA at once; the thread renders and sends them and logs one line each
    (``QUEUEID: notice KIND to <ADDRESS>: sent | limited | failed: why``).  Notices are
    best effort: when ``capacity`` notices are already waiting (an outbreak on a node
    whose re-injection is slow or down), a new one is dropped with a log line.
    :meth:`stop` sends what is waiting, for up to ``grace`` seconds.
    """

    def __init__(self, notifier: Notifier, *, capacity: int = 1000) -> None:
        self.notifier = notifier
        self.capacity = capacity
        self._queue: queue.Queue[tuple[Notice, MessageFacts] | None] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self.results: dict[str, int] = dict.fromkeys(NOTICE_RESULTS, 0)
        """Notices so far by result: sent, limited, failed, dropped (outbox full)."""

    def post(self, notice: Notice, facts: MessageFacts) -> bool:
        """Queue one notice; False (and a log line) when the outbox is full."""
        self._start()
        try:
            self._queue.put_nowait((notice, facts))
        except queue.Full:
            self.results["dropped"] += 1
            log.warning("%s: notice %s to <%s> dropped: %d notices already waiting%s",
                        facts.queue_id or "NOQUEUE", notice.kind, notice.to, self.capacity,
                        f" mwid={facts.mwid}" if facts.mwid else "")
            return False
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="mw-notices", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                notice, facts = item
                result = self.notifier.notify(notice, facts)
                kind = result.split(":", 1)[0]
                self.results[kind] = self.results.get(kind, 0) + 1
                (log.warning if result.startswith("failed") else log.info)(
                    "%s: notice %s to <%s>: %s%s", facts.queue_id or "NOQUEUE", notice.kind, notice.to,
                    result, f" mwid={facts.mwid}" if facts.mwid else "")
            except Exception:  # the thread must outlive any one notice
                log.exception("notice not sent")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float) -> bool:
        """Wait until every notice posted so far is handled; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def stop(self, grace: float = 10.0) -> None:
        """Send what is waiting (for up to ``grace`` seconds), then end the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            return
        if not self.flush(grace):
            log.warning("%d notice(s) not sent: stopping", self._queue.qsize())
            return  # the thread is a daemon: it ends with the process
        self._queue.put(None)
        thread.join(grace)
        self._thread = None
