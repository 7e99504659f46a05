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
    if not parts.netloc and "@" in url:  # no scheme://: user:pw@host would pass through whole
        return "…@" + url.rsplit("@", 1)[1].split("?")[0].split("#")[0]
    text = urlunsplit((parts.scheme, host + port, parts.path, "", ""))
    return text if "@" not in text else "…@" + text.rsplit("@", 1)[1]
