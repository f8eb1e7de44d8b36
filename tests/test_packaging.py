"""What `pip install .` gives: a wheel with the templates and the licence, without the
test harness, whose `mailwarden render` works from a fresh virtual environment.

Built offline: an sdist from a copy of the source (as a release would be), a wheel from
that sdist with this environment's setuptools (``--no-build-isolation --no-index``),
installed with ``--no-deps`` into a new venv.  The dependencies come from the
environment running the tests, added after the venv's own site-packages by a .pth line
(written after the install, so pip never sees the checkout's editable mailwarden).
"""

from __future__ import annotations

import filecmp
import os
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from harness.containers import copy_source
from mailwarden.config import parse_config
from mailwarden.render import render_dovecot, render_postfix

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

CONFIG = '[render]\ndovecot_config_dir = "/etc/dovecot-{role}"\n'
TEMPLATE_TREES = ("postfix-templates", "dovecot-templates")
REPO = Path(__file__).resolve().parents[1]


def run(*cmd: str | Path, cwd: Path) -> str:
    """Run a build or install step, with no PYTHONPATH or coverage hooks from this run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "COV_CORE_", "PIP_REQUIRE_VIRTUALENV"))}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def new_venv(path: Path) -> Path:
    """A venv without pip; returns its python."""
    venv.create(path, with_pip=False, symlinks=True)
    return path / "bin" / "python"


def add_dependencies(python: Path, cwd: Path) -> None:
    """Make this environment's packages (the dependencies) importable in the venv, after its own."""
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                       cwd=cwd).strip())
    (purelib / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def sdist(work: Path) -> Path:
    source = copy_source(work / "source")
    out = work / "sdist"
    name = run(sys.executable, "-c",
               "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
               out, cwd=source).strip().splitlines()[-1]
    return out / name


@pytest.fixture(scope="module")
def wheel(work: Path, sdist: Path) -> Path:
    out = work / "wheel"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
        "--disable-pip-version-check", "-w", out, sdist, cwd=work)
    (built,) = out.glob("mailwarden-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(work: Path, wheel: Path) -> Path:
    """The venv's bin/ after ``pip install --no-deps`` of the wheel."""
    python = new_venv(work / "venv")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        "--disable-pip-version-check", wheel, cwd=work)
    add_dependencies(python, work)
    return python.parent


def test_sdist_carries_the_templates_and_the_licence(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for tree in TEMPLATE_TREES:
        assert {str(p.relative_to(REPO)) for p in (REPO / tree).rglob("*") if p.is_file()} <= names
    assert {"LICENSE", "setup.py", "MANIFEST.in", "mailwarden/templates/default/en/virus.j2"} <= names
    assert not [n for n in names if n.startswith(("harness/", "tests/", "bench/"))]


def test_wheel_holds_product_code_templates_and_licence_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta).decode()
        licence = whl.read(meta.replace("METADATA", "licenses/LICENSE")).decode()
    assert {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")} \
        == {"mailwarden", "milters", "policyd"}
    for tree in TEMPLATE_TREES:
        shipped = {f"mailwarden/{p.relative_to(REPO)}" for p in (REPO / tree).rglob("*") if p.is_file()}
        assert shipped and shipped <= names, tree
    notices = {f"mailwarden/{p.relative_to(REPO / 'mailwarden')}"
               for p in (REPO / "mailwarden" / "templates").rglob("*") if p.is_file()}
    assert notices and notices <= names
    assert "mailwarden/py.typed" in names
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert licence == (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in licence
    assert "APPENDIX: How to apply the Apache License to your work." in licence


def test_installed_wheel_renders_postfix_and_dovecot(installed: Path, tmp_path: Path) -> None:
    python = installed / "python"
    # The installed copy is what runs, and the harness did not come along.
    where = run(python, "-c", "import mailwarden, milters, policyd; print(mailwarden.__file__)",
                cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(installed.parent), where
    missing = run(python, "-c", "import importlib.util; print(importlib.util.find_spec('harness'))",
                  cwd=tmp_path)
    assert missing.strip() == "None"
    config = tmp_path / "mailwarden.toml"
    config.write_text(CONFIG)
    cli = installed / "mailwarden"
    postfix = run(cli, "-c", config, "render", "postfix", "--out", tmp_path / "out", cwd=tmp_path)
    dovecot = run(cli, "-c", config, "render", "dovecot", "--out", tmp_path / "out", cwd=tmp_path)
    assert "postfix-mx:" in postfix and "dovecot-proxy:" in dovecot
    assert (tmp_path / "out" / "postfix-mx" / "main.cf").is_file()
    assert (tmp_path / "out" / "postfix-submission" / "master.cf").is_file()
    assert (tmp_path / "out" / "dovecot-mailbox" / "dovecot.conf").is_file()
    # The same files as rendering from the checkout's templates.
    cfg = parse_config(CONFIG, str(config))
    render_postfix(cfg, [], tmp_path / "checkout")
    render_dovecot(cfg, [], tmp_path / "checkout")
    assert_same_tree(tmp_path / "out", tmp_path / "checkout")
    # The notice templates are package data too.
    listed = run(python, "-c", "from mailwarden.notify import NoticeTemplates; "
                 "print(NoticeTemplates().envs[-1].list_templates())", cwd=tmp_path)
    assert "default/ja/virus.j2" in listed


def test_editable_install_renders_from_the_checkout(work: Path, tmp_path: Path) -> None:
    source = copy_source(work / "editable-source")
    # What `pip install -e` does, with this environment's setuptools (the venv has none).
    out = work / "editable-wheel"
    name = run(sys.executable, "-c",
               "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))",
               out, cwd=source).strip().splitlines()[-1]
    python = new_venv(work / "editable-venv")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        "--disable-pip-version-check", out / name, cwd=work)
    add_dependencies(python, work)
    root = run(python, "-c", "from mailwarden.render import template_root; print(template_root())",
               cwd=tmp_path)
    assert Path(root.strip()).resolve() == source.resolve()
    out = tmp_path / "out"
    run(python.parent / "mailwarden", "render", "postfix", "--role", "mx", "--out", out, cwd=tmp_path)
    assert (out / "postfix-mx" / "main.cf").is_file()


def assert_same_tree(left: Path, right: Path) -> None:
    """Both trees hold the same files with the same bytes."""
    names = sorted(str(p.relative_to(left)) for p in left.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(right)) for p in right.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
