"""The console's tests share the milter tests' real clamd and spamd."""

from tests.milter.conftest import clamd, spamd

__all__ = ["clamd", "spamd"]
