#!/usr/bin/env bash
# Install the Debian packages mailwarden's build, tests and demo need (idempotent).
# Daemons are never started by apt here (policy-rc.d or not): the harness starts its own.
set -euo pipefail

PACKAGES=(
  # build dependencies of python-ldap
  gcc libldap-dev libsasl2-dev
  # real daemons used by the tests and the demo
  slapd ldap-utils redis-server redis-sentinel haproxy
  postfix postfix-ldap swaks
  dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-ldap dovecot-sieve
  clamav-daemon clamav-testfiles spamassassin spamc spamd
  # the second spam engine (milter.spam_engine = "rspamd"; tests/milter/test_rspamd.py)
  rspamd
  # DKIM: openssl makes RSA keys (mailwarden dkim keygen); OpenDKIM's opendkim-testmsg
  # checks that what the milter signs verifies elsewhere (tests/milter/test_signing.py)
  openssl opendkim-tools
  # peers measured side by side in bench/
  postgrey postfix-policyd-spf-python clamav-milter spamass-milter opendkim opendmarc
  iproute2
  # the web console's browser tests (tests/web): Debian's chromium driven by Playwright,
  # and a Japanese font for its screenshots
  chromium fonts-ipafont-gothic
  # the containerized end-to-end suite (dockerd started by the harness)
  docker.io debootstrap iptables docker-compose
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages: ${missing[*]} (run as root or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# OpenDMARC runs here only as a milter: no reporting database (dbconfig would look for MySQL)
echo "opendmarc opendmarc/dbconfig-install boolean false" | debconf-set-selections
apt-get -o DPkg::Lock::Timeout=600 -qq update
apt-get -o DPkg::Lock::Timeout=600 -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
