"""A library's version as a tuple, and the one-line error of a shim whose internals are gone."""
from __future__ import annotations

import re


def version_tuple(text: str) -> tuple[int, ...]:
    """``"0.19.8+abc"`` -> ``(0, 19, 8)``: the leading numeric release parts."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def missing(library: str, version: str, shim: str, what: str) -> RuntimeError:
    """The error of a shim whose library no longer has what it reaches into."""
    return RuntimeError(f"degla_fast.compat.{shim}: {library} {version} has no {what} (the shim was written "
                        f"against the versions its module names); pin a supported {library} or update the shim")
