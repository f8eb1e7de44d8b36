"""A real OpenLDAP slapd for tests, benchmarks and the demo.

The server is configured through cn=config built with ``slapadd -n0`` (so the
shipped schema LDIF is loaded exactly as an operator would load it), data is
bulk-loaded with ``slapadd``, and slapd listens on 127.0.0.1 and a private
ldapi socket.  It is stopped by its own PID only.
"""

from __future__ import annotations

import dataclasses
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
    access: Sequence[str] = ("to attrs=userPassword by anonymous auth by self write by * none",
                             "to * by * read")
    """The database's ``olcAccess`` rules in order (the mail tree gets the shipped ones)."""
    syncprov: bool = False
    """A syncrepl provider: the syncprov overlay on this database."""
    provider_uri: str = ""
    """A syncrepl consumer (refreshAndPersist) of this URI, bound as the root DN; writes
    are referred there (``olcUpdateRef``)."""

    @property
    def rootdn(self) -> str:
        """The database's root (manager) DN."""
        return f"cn=admin,{self.suffix}"

    def replication_config(self) -> list[str]:
        """The database entry's lines for replication (the consumer's syncrepl and referral)."""
        if not self.provider_uri:
            return []
        return [
            f"olcSyncrepl: {{0}}rid=001 provider={self.provider_uri} bindmethod=simple "
            f'binddn="{self.rootdn}" credentials={self.rootpw} searchbase="{self.suffix}" '
            'type=refreshAndPersist retry="1 +" timeout=1 network-timeout=1',
            f"olcUpdateRef: {self.provider_uri}",
        ]


SUFFIX = "dc=mailwarden,dc=test"
SERVICE_DN = f"cn=mailwarden,ou=services,{SUFFIX}"
"""The sample tree's read-only account for the daemons (password ``secret``)."""
SERVICE_BIND = f'bind_dn = "{SERVICE_DN}"\nbind_password = "secret"\n'
"""``[ldap]`` lines binding a configuration to the sample tree as the daemons' account:
the shipped ACLs give anonymous clients nothing but a bind."""


def mailwarden_database(*extra_ldif: Path) -> Database:
    """The shipped sample tree (ldap/sample.ldif) plus any extra LDIF, guarded by the
    shipped access rules (generated from the catalogue, as ``ldap/acl.ldif``)."""
    from mailwarden.acl import acl_rules

    return Database(SUFFIX, [REPO / "ldap" / "sample.ldif", *extra_ldif],
                    access=tuple(acl_rules(SUFFIX)))


REPLICATION_INDEXES = ("entryCSN eq", "entryUUID eq")


def provider_database() -> Database:
    """The sample tree as a syncrepl provider (syncprov overlay)."""
    db = mailwarden_database()
    return dataclasses.replace(db, syncprov=True, indexes=(*db.indexes, *REPLICATION_INDEXES))


def consumer_database(provider: SlapdServer) -> Database:
    """An empty copy of the sample tree that replicates ``provider`` (a read-only consumer)."""
    db = mailwarden_database()
    return dataclasses.replace(db, ldif=(), provider_uri=provider.uri,
                               indexes=(*db.indexes, *REPLICATION_INDEXES))


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
        modules = "olcModuleLoad: syncprov\n" if any(db.syncprov for db in self.databases) else ""
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
{modules}
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
            extra = "\n".join([*db.replication_config(), *db.extra_config])
            access = "\n".join(f"olcAccess: {{{n}}}{rule}" for n, rule in enumerate(db.access))
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
{access}
{extra}
"""
            )
            if db.syncprov:
                parts.append(
                    f"""dn: olcOverlay={{0}}syncprov,olcDatabase={{{i}}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {{0}}syncprov
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


class ReplicatedSlapd:
    """A syncrepl provider with the sample data and one consumer replicating it; a context
    manager. ``uris`` lists both, the provider first, as ``[ldap] uri`` would."""

    def __init__(self) -> None:
        self.provider = SlapdServer([provider_database()])
        self.consumer: SlapdServer | None = None

    @property
    def uris(self) -> str:
        """``PROVIDER CONSUMER``."""
        assert self.consumer is not None
        return f"{self.provider.uri} {self.consumer.uri}"

    def start(self) -> ReplicatedSlapd:
        """Start both and wait until the consumer holds the sample tree."""
        self.provider.start()
        self.consumer = SlapdServer([consumer_database(self.provider)]).start()
        self.wait_replicated("uid=taro,ou=users,mwDomainName=example.jp,ou=domains,dc=mailwarden,dc=test",
                             "(mail=taro@example.jp)")
        return self

    def wait_replicated(self, dn: str, filterstr: str, timeout: float = 10.0) -> None:
        """Wait until the consumer finds ``dn`` matching ``filterstr``."""
        import ldap

        assert self.consumer is not None
        conn = ldap.initialize(self.consumer.uri)
        db = self.consumer.databases[0]
        conn.simple_bind_s(db.rootdn, db.rootpw)  # the access rules hide the tree from anonymous
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if conn.search_s(dn, ldap.SCOPE_BASE, filterstr, ["1.1"]):
                        return
                except ldap.NO_SUCH_OBJECT:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dn} {filterstr} not on the consumer within {timeout:g} s:\n"
                                       + self.consumer.log_tail())
                time.sleep(0.02)
        finally:
            conn.unbind_s()

    def cleanup(self) -> None:
        """Stop both (by PID) and remove their directories."""
        if self.consumer is not None:
            self.consumer.cleanup()
        self.provider.cleanup()

    def __enter__(self) -> ReplicatedSlapd:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
