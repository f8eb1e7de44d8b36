"""The one build step pyproject.toml cannot declare: the configuration templates.

The Postfix and Dovecot templates stay at the top of the repository
(``postfix-templates/``, ``dovecot-templates/``), where operators look for them.  The
wheel carries them inside the package (``mailwarden/postfix-templates/`` ...), where
``mailwarden.render.template_root()`` finds them once installed; an editable install
reads them from the checkout instead.  Everything else is in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATE_DIRS = ("postfix-templates", "dovecot-templates")


class BuildPyWithTemplates(build_py):
    """``build_py``, then the template trees copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in TEMPLATE_DIRS:
            source = Path(name)
            if not source.is_dir():
                raise FileNotFoundError(f"{name}/ is missing from the source tree")
            for path in sorted(source.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    target = Path(self.build_lib, "mailwarden", name, path.relative_to(source))
                    self.mkpath(str(target.parent))
                    self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": BuildPyWithTemplates})
