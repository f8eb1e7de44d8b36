"""``mailwarden policyd ...``: run and inspect the Postfix policy daemon."""

from __future__ import annotations

from mailwarden.cli import main


@main.group("policyd")
def policyd_group() -> None:
    """The Postfix policy daemon (check_policy_service)."""
