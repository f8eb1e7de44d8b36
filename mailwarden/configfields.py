"""Declaring configuration fields: every section (the core's and the daemons' registered ones)
declares each field through :func:`setting`, which gives it a default and a one-line description."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, doc: str, *, factory: Any = None) -> Any:
    """Declare a configuration field with its default and one-line description."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})
