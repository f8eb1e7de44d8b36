"""``make demo`` / ``make demo-stop``: a local stack to try mailwarden on this machine.

Brings up, on 127.0.0.1 only, a real slapd loaded with the shipped schema and the
sample directory (ldap/sample.ldif) and a redis-server for shared state, writes a
mailwarden.toml pointing at them, and prints what to try.  State and PIDs live in
``.state/demo``; ``down`` stops exactly the processes ``up`` started.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from harness.redisserver import RedisServer
from harness.slapd import REPO, SlapdServer, mailwarden_database

STATE = Path(os.environ.get("MAILWARDEN_DEMO_DIR", REPO / ".state" / "demo"))
LDAP_PORT = int(os.environ.get("MAILWARDEN_DEMO_LDAP_PORT", "3389"))
REDIS_PORT = int(os.environ.get("MAILWARDEN_DEMO_REDIS_PORT", "6390"))


def _pidfiles() -> dict[str, Path]:
    return {name: STATE / f"{name}.pid" for name in ("slapd", "redis")}


def _alive(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the process we started (not a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.encode() in cmdline


def up() -> int:
    """Start the demo stack (fresh each time) and print how to use it."""
    down(quiet=True)
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    slapd = SlapdServer([mailwarden_database()], workdir=STATE / "slapd", port=LDAP_PORT)
    slapd.start()
    assert slapd.proc is not None
    _pidfiles()["slapd"].write_text(str(slapd.proc.pid))
    redis = RedisServer(port=REDIS_PORT).start()
    _pidfiles()["redis"].write_text(str(redis.pid))
    config = STATE / "mailwarden.toml"
    config.write_text(
        f'[ldap]\nuri = "{slapd.uri}"\nbind_dn = "cn=admin,dc=mailwarden,dc=test"\n'
        f'bind_password = "secret"\n\n[store]\nbackend = "redis"\n'
        f'redis_url = "{redis.url}"\n',
        encoding="utf-8",
    )
    print(f"""
mailwarden demo is up (all on 127.0.0.1):
  slapd        {slapd.uri}  base dc=mailwarden,dc=test  (admin: cn=admin,dc=mailwarden,dc=test / secret)
  redis        {redis.url}
  config       {config}

Try:
  export MAILWARDEN_CONFIG={config}
  .venv/bin/mailwarden explain taro@example.jp          # every value with its source
  .venv/bin/mailwarden explain taro.yamada@example.ne.jp   # alias + domain alias
  .venv/bin/mailwarden domain disable example.com spam-check
  .venv/bin/mailwarden explain alice@example.com        # now off, "from domain"
  .venv/bin/mailwarden user set hanako@example.jp spam_threshold 4.0
  .venv/bin/mailwarden config check --connect
  .venv/bin/mailwarden --as jp-admin user enable hanako@example.jp spam_check   # password: secret
  .venv/bin/mailwarden --as jp-admin audit show --domain example.jp
  ldapsearch -x -H {slapd.uri} -D uid=jp-admin,ou=admins,dc=mailwarden,dc=test -w secret \
      -b dc=mailwarden,dc=test mail                   # example.jp only (the access rules)
  ldapsearch -x -H {slapd.uri} -b dc=mailwarden,dc=test mail   # anonymous: nothing

Stop it with: make demo-stop
""")
    return 0


def down(*, quiet: bool = False) -> int:
    """Stop the processes recorded by ``up`` (by PID) and keep nothing running."""
    stopped = []
    for name, pidfile in _pidfiles().items():
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
        if _alive(pid, name):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _alive(pid, name):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
            stopped.append(f"{name} (pid {pid})")
        pidfile.unlink(missing_ok=True)
    if not quiet:
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def main(argv: list[str]) -> int:
    """``python -m harness.demo up|down``."""
    if argv[1:] == ["up"]:
        return up()
    if argv[1:] == ["down"]:
        return down()
    print("usage: python -m harness.demo up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
