"""The web console (``mailwarden web run``) as a child process on a loopback port."""

from __future__ import annotations

import secrets
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Self

from harness.ports import free_port
from harness.process import TestDaemon, file_tail


class WebConsole(TestDaemon):
    """The console with ``sections`` (the rest of its configuration file: [ldap], [store],
    [milter] ...) and a ``[web]`` section of its own: a fresh secret key, cookies without
    Secure (plain HTTP on loopback), and ``web_keys`` added."""

    name = "mailwarden web"

    def __init__(self, sections: str, web_keys: str = "", workdir: Path | None = None) -> None:
        self.owns_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="mw-web-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        key = self.dir / "web.key"
        key.write_text(secrets.token_urlsafe(48))
        key.chmod(0o600)
        self.config_path = self.dir / "mailwarden.toml"
        self.config_path.write_text(
            f"{sections}\n[web]\nlisten = \"127.0.0.1:{self.port}\"\nsecret_key_file = \"{key}\"\n"
            f"secure_cookies = false\n{web_keys}\n"
        )
        self.log_path = self.dir / "web.log"

    @property
    def url(self) -> str:
        """The console's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start and wait until /healthz answers."""
        self.launch([sys.executable, "-c", "from mailwarden.cli import main; main()",
                     "--config", str(self.config_path), "web", "run"],
                    self.log_path, self._answers, timeout=20.0)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:  # noqa: S310 (http on loopback)
                return bool(response.status == 200)
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        """The end of the console's log."""
        return file_tail(self.log_path, lines)

    def log(self) -> str:
        """The whole log."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
