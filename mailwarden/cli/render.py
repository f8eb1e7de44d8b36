"""``mailwarden render ...``: Postfix and Dovecot configuration fragments."""

from __future__ import annotations

from mailwarden.cli import main


@main.group("render")
def render_group() -> None:
    """Render Postfix / Dovecot configuration from the mailwarden configuration."""
