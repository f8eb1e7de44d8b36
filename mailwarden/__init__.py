"""mailwarden: per-subscriber mail filtering for Postfix and Dovecot, driven by LDAP.

The core shared by the milter (``milters``), the policy daemon (``policyd``) and the
``mailwarden`` command: configuration, the subscriber directory, the effective policy
and the shared state store.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailwarden")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
