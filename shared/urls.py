"""URLs as they may appear in a message: never with the user and password a URL can carry.

A ``--server https://ops:pw@host`` (or a proxy URL) quoted back in "cannot reach …" would put the
password in a terminal, a CI log or a journal; messages show ``https://host`` instead.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def shown(url: str) -> str:
    """``url`` without its credentials (and without query and fragment, which can hold tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # an unparsable port: show nothing of it rather than guess
        return "<unparsable URL>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))
