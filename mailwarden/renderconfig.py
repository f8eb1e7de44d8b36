"""The ``[render]`` configuration section: facts about the site the Postfix/Dovecot fragments need."""

from __future__ import annotations

from dataclasses import dataclass

from mailwarden.confbase import setting


@dataclass(frozen=True)
class RenderConfig:
    """Inputs for ``mailwarden render postfix|dovecot``."""

    myhostname: str = setting("mx.example.net", "this node's host name in SMTP greetings")
