"""The ``[web]`` configuration section: the web console's listener, sessions and throttling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailwarden.config import Config, Section
from mailwarden.configfields import setting
from mailwarden.metrics import parse_listen


@dataclass(frozen=True)
class WebConfig:
    """The web console (``mailwarden web run``)."""

    listen: str = setting("127.0.0.1:8025", "host:port the console listens on (put TLS in front of it)")
    secret_key_file: str = setting(
        "/etc/mailwarden/web.key",
        "file holding the console's secret key (32+ random bytes, readable by the console only): it "
        "encrypts the directory password kept with a session",
    )
    trusted_proxies: list[str] = setting(
        None, "addresses of the TLS proxies in front whose X-Forwarded-For names the client "
        "(empty: the peer address is the client)", factory=list,
    )
    session_lifetime: float = setting(
        3600.0, "seconds a login lasts; after that the person logs in again"
    )
    secure_cookies: bool = setting(
        True, "send the session cookie only over HTTPS (off only for a console on loopback)"
    )
    login_failures_per_account: int = setting(
        5, "failed logins for one account within login_window before that account is refused"
    )
    login_failures_per_client: int = setting(
        20, "failed logins from one client address within login_window before it is refused"
    )
    login_window: float = setting(
        900.0, "seconds failed logins are counted (in the shared store, so across every node)"
    )
    metrics_urls: list[str] = setting(
        None, "this node's /metrics URLs for the dashboard (empty: every daemon's metrics_listen)",
        factory=list,
    )
    cluster_metrics_urls: list[str] = setting(
        None, "every node's /metrics URLs, added up as the cluster on the dashboard (empty: none)",
        factory=list,
    )
    dashboard_refresh: float = setting(5.0, "seconds between dashboard chart refreshes")

    @classmethod
    def of(cls, config: Config) -> WebConfig:
        """The section of ``config``."""
        return config.section(cls)


def check_section(config: Config) -> list[str]:
    """Problems in ``[web]``: ``web.key: problem``."""
    cfg = WebConfig.of(config)
    problems: list[str] = []
    try:
        parse_listen(cfg.listen)
    except ValueError as exc:
        problems.append(f"web.listen: {exc}")
    for key in ("session_lifetime", "login_window", "dashboard_refresh"):
        if getattr(cfg, key) <= 0:
            problems.append(f"web.{key}: must be positive")
    for key in ("login_failures_per_account", "login_failures_per_client"):
        if getattr(cfg, key) < 1:
            problems.append(f"web.{key}: must be at least 1")
    for key in ("metrics_urls", "cluster_metrics_urls"):
        for i, url in enumerate(getattr(cfg, key)):
            if not url.startswith(("http://", "https://")):
                problems.append(f"web.{key}[{i}]: {url!r} is not an http(s) URL")
    return problems


def key_problems(cfg: WebConfig) -> list[str]:
    """Problems with the secret key file (checked by ``mailwarden web check``, not by every command)."""
    path = Path(cfg.secret_key_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"web.secret_key_file: {path}: {exc.strerror}"]
    if len(data.strip()) < 32:
        return [f"web.secret_key_file: {path}: holds {len(data.strip())} bytes, 32 or more are needed"]
    if path.stat().st_mode & 0o077:
        return [f"web.secret_key_file: {path}: readable by others (chmod 600)"]
    return []


SECTION = Section("web", WebConfig, "web console", check=check_section)
"""Registered in the ``mailwarden.sections`` entry-point group (pyproject.toml)."""
