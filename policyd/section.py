"""What the policy daemon registers with the core: its ``[policyd]`` configuration section.

Named in the ``mailwarden.sections`` entry-point group (pyproject.toml).  A module of
its own, above both the section (:mod:`policyd.config`) and the check that needs the
daemon's wiring (:func:`policyd.app.validate`), so neither imports the other.
"""

from __future__ import annotations

from mailwarden.config import Config, Section
from policyd.config import PolicydConfig


def check_section(config: Config) -> list[str]:
    """Problems in ``[policyd]``, each as ``policyd.key: problem``."""
    # The daemon's wiring is imported when a check runs, not whenever a Config is built.
    from policyd.app import validate

    return validate(PolicydConfig.of(config))


SECTION = Section("policyd", PolicydConfig, "Postfix policy daemon", check=check_section)
