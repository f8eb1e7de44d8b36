"""Handing mail back to Postfix: content variants, notices and released quarantine.

Everything goes over SMTP to a dedicated Postfix smtpd (``milter.reinject``) that
runs without milters and without the policy daemon, so nothing is filtered
twice and nothing loops.  The original client, HELO and queue id travel in
XFORWARD when that smtpd allows it, so the Postfix log links the copy to the
message it came from.  The body is streamed (dot-stuffed on the fly), so a huge
variant is never held in memory.  Any refusal raises :class:`InjectError`.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mailwarden.endpoint import Endpoint
from milters.scanners.upstreams import DeadlineExceeded, remaining

_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")
_PASSED_MAIL_PARAMS = ("BODY", "SMTPUTF8", "RET", "ENVID")
_PASSED_RCPT_PARAMS = ("NOTIFY", "ORCPT")


class InjectError(Exception):
    """The re-injection service refused or could not be reached."""


@dataclass(frozen=True)
class Origin:
    """Where the original message came from (sent as XFORWARD)."""

    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    queue_id: str = ""


class Injector(Protocol):
    """Submits a message to the MTA."""

    def send(self, sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
             *, deadline: float, origin: Origin | None = None,
             mail_params: tuple[str, ...] = ()) -> str:
        """Submit; return the new queue id (or the reply text). Raise InjectError."""
        ...


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside printable ASCII as +HH."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
        for c in value
    )


def dot_stuff(chunk: bytes, at_line_start: bool) -> bytes:
    """Double the leading dot of every line in ``chunk`` (SMTP transparency)."""
    out = chunk.replace(b"\n.", b"\n..")
    if at_line_start and out.startswith(b"."):
        out = b"." + out
    return out


def _params(params: Iterable[str], allowed: tuple[str, ...]) -> list[str]:
    return [p for p in params if p.split("=", 1)[0].upper() in allowed]


class SmtpInjector:
    """The real Injector: SMTP to the re-injection smtpd (``inet:host:port``; Postfix offers
    an smtpd on TCP)."""

    def __init__(self, address: str, *, timeout: float = 30.0, helo: str = "localhost") -> None:
        self.endpoint = Endpoint.parse(address)
        if self.endpoint.is_unix:
            raise ValueError(f"{address}: the re-injection smtpd is reached as inet:host:port")
        self.timeout = timeout
        self.helo = helo

    def send(self, sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
             *, deadline: float, origin: Origin | None = None,
             mail_params: tuple[str, ...] = ()) -> str:
        """Submit the message; raise InjectError on any refusal or timeout."""
        try:
            return self._send(sender, recipients, data, deadline=deadline, origin=origin,
                              mail_params=mail_params)
        except smtplib.SMTPResponseException as exc:
            raise InjectError(f"{self.endpoint}: {exc.smtp_code} {exc.smtp_error!r}") from None
        except (smtplib.SMTPException, OSError, DeadlineExceeded) as exc:
            raise InjectError(f"{self.endpoint}: {exc or type(exc).__name__}") from None

    def _send(self, sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
              *, deadline: float, origin: Origin | None, mail_params: tuple[str, ...]) -> str:
        with smtplib.SMTP(local_hostname=self.helo, timeout=remaining(deadline, self.timeout)) as smtp:
            code, reply = smtp.connect(self.endpoint.where, self.endpoint.port)
            if code != 220:
                raise smtplib.SMTPConnectError(code, reply)
            smtp.ehlo()
            if origin is not None and smtp.has_extn("xforward"):
                self._xforward(smtp, origin, deadline)
            dsn = smtp.has_extn("dsn")
            mparams = _params(mail_params, _PASSED_MAIL_PARAMS if dsn else _PASSED_MAIL_PARAMS[:2])
            if not smtp.has_extn("8bitmime"):
                mparams = [p for p in mparams if not p.upper().startswith("BODY=")]
            if not smtp.has_extn("smtputf8"):
                mparams = [p for p in mparams if p.upper() != "SMTPUTF8"]
            self._tick(smtp, deadline)
            code, reply = smtp.mail(sender, mparams)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, sender)
            for address, params in recipients:
                self._tick(smtp, deadline)
                code, reply = smtp.rcpt(address, _params(params, _PASSED_RCPT_PARAMS) if dsn else [])
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({address: (code, reply)})
            self._tick(smtp, deadline)
            code, reply = smtp.docmd("DATA")
            if code != 354:
                raise smtplib.SMTPDataError(code, reply)
            at_line_start = True
            last = b"\n"
            for chunk in data:
                if not chunk:
                    continue
                self._tick(smtp, deadline)
                smtp.send(dot_stuff(chunk, at_line_start))
                at_line_start = chunk.endswith(b"\n")
                last = chunk[-2:]
            self._tick(smtp, deadline)
            smtp.send((b"" if last.endswith(b"\r\n") else b"\r\n") + b".\r\n")
            code, reply = smtp.getreply()
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
            text = reply.decode("utf-8", "replace")
            found = _QUEUED.search(text)
            return found.group(1) if found else text

    @staticmethod
    def _tick(smtp: smtplib.SMTP, deadline: float) -> None:
        if smtp.sock is not None:
            smtp.sock.settimeout(remaining(deadline, smtp.timeout))

    def _xforward(self, smtp: smtplib.SMTP, origin: Origin, deadline: float) -> None:
        # Postfix gives milters "[1.2.3.4]" for a client without a name; XFORWARD wants a name.
        name = origin.client_name if origin.client_name and not origin.client_name.startswith("[") else ""
        attrs = {
            "NAME": name or "[UNAVAILABLE]",
            "ADDR": origin.client_address or "[UNAVAILABLE]",
            "PROTO": "ESMTP",
            "HELO": origin.helo or "[UNAVAILABLE]",
        }
        if origin.queue_id:
            attrs["IDENT"] = origin.queue_id
        self._tick(smtp, deadline)
        code, reply = smtp.docmd("XFORWARD", " ".join(f"{k}={xtext(v)}" for k, v in attrs.items()))
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
