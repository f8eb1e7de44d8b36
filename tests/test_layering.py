"""The core (mailwarden/) names neither daemon: they register with it through entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("milters", "policyd")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_core_imports_no_daemon() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "mailwarden").rglob("*.py"))
        for name in sorted(_imports(path))
        if name.split(".")[0] in DAEMONS
    ]
    assert offenders == []


def test_cli_modules_do_not_import_the_main_group() -> None:
    # The shared helpers live in mailwarden.cli.common; only the package itself
    # (which builds `main`) imports the command modules.
    for name in ("common.py", "admin.py", "render.py"):
        assert "mailwarden.cli" not in _imports(ROOT / "mailwarden" / "cli" / name), name
    for path in (ROOT / "milters" / "cli.py", ROOT / "policyd" / "cli.py"):
        assert "mailwarden.cli" not in _imports(path), path


def test_registered_command_groups_reach_the_main_group() -> None:
    from mailwarden.cli import main

    ctx = click.Context(main)
    commands = main.list_commands(ctx)
    assert {"milter", "quarantine", "policyd", "config", "render", "domain", "user"} <= set(commands)
    milter = main.get_command(ctx, "milter")
    assert isinstance(milter, click.Group) and "check" in milter.commands


def test_no_private_module_of_another_library_is_imported() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("mailwarden", "policyd")
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(_imports(path) | _imported_by_name(path))
        if name.split(".")[0] not in ("mailwarden", "milters", "policyd", "__future__")
        and any(part.startswith("_") for part in name.split("."))
    ]
    assert offenders == []


def _imported_by_name(path: Path) -> set[str]:
    """Modules named in ``importlib.import_module("...")`` calls."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found
