"""The ``[policyd]`` configuration section."""

from __future__ import annotations

from dataclasses import dataclass

from mailwarden.confbase import setting


@dataclass(frozen=True)
class PolicydConfig:
    """The Postfix policy daemon."""

    listen: list[str] = setting(
        None, "where to listen: unix:/path or inet:host:port", factory=lambda: ["inet:127.0.0.1:10031"]
    )
