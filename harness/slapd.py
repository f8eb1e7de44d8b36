"""A real OpenLDAP slapd for tests, benchmarks and the demo.

The server is configured through cn=config built with ``slapadd -n0`` (so the
shipped schema LDIF is loaded exactly as an operator would load it), data is
bulk-loaded with ``slapadd``, and slapd listens on 127.0.0.1 and a private
ldapi socket.  It is stopped by its own PID only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.ports import free_port
from harness.process import TestDaemon, file_tail

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = Path("/etc/ldap/schema")
SLAPD = shutil.which("slapd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
SLAPADD = shutil.which("slapadd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
MODULE_PATH = Path("/usr/lib/ldap")


@dataclass
class Database:
    """One mdb database with its suffix, root credentials and initial LDIF files."""

    suffix: str
    ldif: Sequence[Path] = ()
    rootpw: str = "secret"
    indexes: Sequence[str] = (
        "objectClass eq",
        "mail,mwAlternateAddress,mwDomainName,mwDomainAlias eq",
    )
    extra_config: list[str] = field(default_factory=list)

    @property
    def rootdn(self) -> str:
        """The database's root (manager) DN."""
        return f"cn=admin,{self.suffix}"


def mailwarden_database(*extra_ldif: Path) -> Database:
    """The shipped sample tree (ldap/sample.ldif) plus any extra LDIF."""
    return Database("dc=mailwarden,dc=test", [REPO / "ldap" / "sample.ldif", *extra_ldif])


class SlapdServer(TestDaemon):
    """Start a private slapd; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        databases: Sequence[Database],
        *,
        schemas: Sequence[Path] = (),
        workdir: Path | None = None,
        port: int | None = None,
    ) -> None:
        if SLAPD is None or SLAPADD is None:
            raise RuntimeError("slapd/slapadd not found: apt-get install slapd ldap-utils")
        self.databases = list(databases)
        self.schemas = [
            SCHEMA_DIR / "core.ldif", SCHEMA_DIR / "cosine.ldif", SCHEMA_DIR / "nis.ldif",
            SCHEMA_DIR / "inetorgperson.ldif", REPO / "ldap" / "mailwarden.ldif", *schemas,
        ]
        self.owns_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="mw-slapd-"))
        self.port = port or free_port()
        self.sock = self.dir / "ldapi"
        self._configured = False

    @property
    def uri(self) -> str:
        """``ldap://127.0.0.1:PORT/``."""
        return f"ldap://127.0.0.1:{self.port}/"

    @property
    def ldapi_uri(self) -> str:
        """The private ldapi:// socket URI."""
        return "ldapi://" + urllib.parse.quote(str(self.sock), safe="")

    def _config_ldif(self) -> str:
        includes = "\n".join(f"include: file://{p}" for p in self.schemas)
        peercred = f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
        parts = [
            f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {self.dir}/slapd.pid
olcLogLevel: none

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcSizeLimit: 1000

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact={peercred} manage by * break
"""
        ]
        for i, db in enumerate(self.databases, start=1):
            idx = "\n".join(f"olcDbIndex: {x}" for x in db.indexes)
            extra = "\n".join(db.extra_config)
            parts.append(
                f"""dn: olcDatabase={{{i}}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{{i}}}mdb
olcSuffix: {db.suffix}
olcDbDirectory: {self.dir}/db{i}
olcRootDN: {db.rootdn}
olcRootPW: {db.rootpw}
olcDbMaxSize: 4294967296
{idx}
olcAccess: {{0}}to attrs=userPassword by anonymous auth by self write by * none
olcAccess: {{1}}to * by * read
{extra}
"""
            )
        return "\n".join(p.rstrip("\n") + "\n" for p in parts)

    def configure(self) -> None:
        """Build cn=config and load each database's LDIF (offline, with slapadd)."""
        conf = self.dir / "slapd.d"
        shutil.rmtree(conf, ignore_errors=True)
        conf.mkdir(parents=True)
        for i in range(1, len(self.databases) + 1):
            (self.dir / f"db{i}").mkdir(exist_ok=True)
        (self.dir / "config.ldif").write_text(self._config_ldif(), encoding="utf-8")
        self._run([SLAPADD, "-n0", "-F", str(conf), "-l", str(self.dir / "config.ldif")])
        for db in self.databases:
            for ldif in db.ldif:
                self._run([SLAPADD, "-q", "-F", str(conf), "-b", db.suffix, "-l", str(ldif)])
        self._configured = True

    def _run(self, cmd: list[str | None]) -> None:
        args = [str(c) for c in cmd]
        res = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")

    def start(self) -> SlapdServer:
        """Start slapd (configuring on first start) and wait until it answers."""
        if not self._configured:
            self.configure()
        log = (self.dir / "slapd.log").open("ab")
        self.proc = subprocess.Popen(
            [str(SLAPD), "-F", str(self.dir / "slapd.d"), "-h", f"{self.uri} {self.ldapi_uri}",
             "-d", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        import ldap

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                conn = ldap.initialize(self.uri)
                conn.set_option(ldap.OPT_NETWORK_TIMEOUT, 1.0)
                conn.search_s("", ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"])
                conn.unbind_s()
                return
            except ldap.LDAPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"slapd did not answer on {self.uri}:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The end of slapd's log, for error messages."""
        return file_tail(self.dir / "slapd.log", lines)
