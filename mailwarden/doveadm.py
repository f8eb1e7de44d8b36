"""A client of Dovecot's doveadm HTTP API (``/doveadm/v1``), for the mailboxes Dovecot keeps.

Commands go as JSON ``[[command, parameters, tag]]`` and come back as
``[["doveadmResponse", result, tag]]`` or ``[["error", {"type": ..., "exitCode": N}, tag]]``;
the API key travels base64 encoded in ``Authorization: X-Dovecot-API``.  The standard
library's HTTP client is enough for one request per command from a CLI.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class DoveadmError(Exception):
    """The API did not answer, refused the key, or the command failed."""

    def __init__(self, message: str, *, exit_code: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        """doveadm's exit code for a failed command (67: no such user; 75: temporary)."""


def read_api_key(path: str, what: str = "doveadm API key") -> str:
    """A secret from its file (whitespace stripped); DoveadmError when it cannot be read."""
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise DoveadmError(f"{what} {path}: {exc.strerror}") from None
    if not key:
        raise DoveadmError(f"{what} {path} is empty")
    return key


class Doveadm:
    """One doveadm HTTP endpoint (``http://HOST:PORT/doveadm/v1``)."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise DoveadmError(f"doveadm API URL {url!r} is not http:// or https://")
        self.url = url
        self.timeout = timeout
        self._auth = "X-Dovecot-API " + base64.b64encode(api_key.encode()).decode()

    def run(self, command: str, **parameters: Any) -> Any:
        """Run one command; its result (a list of rows for most commands)."""
        body = json.dumps([[command, parameters, "mw"]]).encode()
        # The scheme is checked in __init__: http or https only.
        request = urllib.request.Request(self.url, data=body, method="POST", headers={  # noqa: S310
            "Content-Type": "application/json", "Authorization": self._auth})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise DoveadmError(f"doveadm {command} at {self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DoveadmError(f"doveadm {command} at {self.url}: {reason}", exit_code=75) from None
        try:
            kind, result, _tag = answer[0]
        except (TypeError, ValueError, IndexError, KeyError):
            text = str(answer)[:200]
            raise DoveadmError(f"doveadm {command} at {self.url}: unexpected answer {text}") from None
        if kind == "error":
            code = int(result.get("exitCode", 0)) if isinstance(result, dict) else 0
            what = result.get("type", "error") if isinstance(result, dict) else result
            raise DoveadmError(f"doveadm {command} for {parameters.get('user', '-')}: {what} (exit {code})",
                               exit_code=code)
        return result
