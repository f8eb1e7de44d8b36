"""``mailwarden milter ...``: run and inspect the content milter."""

from __future__ import annotations

from mailwarden.cli import main


@main.group("milter")
def milter_group() -> None:
    """The content milter (smtpd_milters / non_smtpd_milters)."""
