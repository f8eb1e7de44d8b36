"""The ``[milter]`` configuration section."""

from __future__ import annotations

from dataclasses import dataclass

from mailwarden.confbase import setting


@dataclass(frozen=True)
class MilterConfig:
    """The content milter."""

    socket: str = setting(
        "unix:/var/spool/postfix/mailwarden/milter.sock",
        "milter socket (unix:/path; a unix socket avoids libmilter's TCP stalls)",
    )
