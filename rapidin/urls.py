"""URLs of data, models and stores: a local path, or a URL whose scheme fsspec can open."""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_url(url: str, what: str, error: type[Exception] = ValueError) -> str:
    """`url` if it is a local path or has a scheme fsspec knows; else `error` naming `what` and the choices."""
    import fsspec

    match = _SCHEME.match(url)
    if match and match.group(1).lower() not in fsspec.available_protocols():
        raise error(f"{what}: unknown URL scheme {match.group(1)!r} in {url!r} "
                         "(use a local path or file://, s3://, gs://, memory:// ...)")
    return url
