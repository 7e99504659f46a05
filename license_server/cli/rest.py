"""The CLI's HTTP client for the REST API, plus table/JSON output.

Failures end the command with a one-line reason and a non-zero exit (``click.ClickException``):
the server's ``{"error", "message"}`` when it answered, the connection problem when it did not.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any

import click
import requests

from layerlock.shared.urls import shown

DEFAULT_SERVER = "http://127.0.0.1:8700"


class ApiClient:
    def __init__(self, server: str, api_key: str | None, timeout: float = 15.0) -> None:
        self.server = server.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        if not self.api_key:
            raise click.ClickException("no API key: pass --api-key or set LAYERLOCK_API_KEY")
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            resp = requests.request(method, self.server + path, json=body, headers=headers, timeout=self.timeout,
                                    params={k: v for k, v in (params or {}).items() if v is not None})
        except requests.RequestException as exc:
            raise click.ClickException(f"cannot reach {shown(self.server)}: {type(exc).__name__}") from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code >= 400:
            if isinstance(doc, dict) and "error" in doc:
                raise click.ClickException(f"{doc['error']}: {doc.get('message', '')} (HTTP {resp.status_code})")
            raise click.ClickException(f"HTTP {resp.status_code} from {shown(self.server)}")
        return doc

    def walk(self, path: str, params: dict[str, Any], limit: int | None) -> Iterable[dict[str, Any]]:
        """Follow ``next_cursor`` until the end (or ``limit`` items)."""
        count = 0
        cursor: Any = None
        while True:
            doc = self.call("GET", path, params={**params, "cursor": cursor, "limit": 500 if limit is None
                                                 else min(500, limit - count)})
            for item in doc["items"]:
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            cursor = doc.get("next_cursor")
            if cursor is None:
                return


def rest_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --server/--api-key/--json and passes a ready ``client`` and ``as_json``."""
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @click.option("--api-key", envvar="LAYERLOCK_API_KEY", help="API key (env LAYERLOCK_API_KEY).")
    @click.option("--server", envvar="LAYERLOCK_SERVER", default=DEFAULT_SERVER, show_default=True,
                  help="License server URL (env LAYERLOCK_SERVER).")
    @wraps(fn)
    def wrapper(server: str, api_key: str | None, as_json: bool, **kwargs: Any) -> Any:
        return fn(client=ApiClient(server, api_key), as_json=as_json, **kwargs)
    return wrapper


def emit(doc: Any, as_json: bool, columns: list[str] | None = None) -> None:
    """JSON for scripts; a table (lists) or key: value lines (objects) for people."""
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=False))
        return
    items = doc.get("items") if isinstance(doc, dict) and "items" in doc else doc
    if isinstance(items, list):
        table(items, columns or (list(items[0]) if items else []))
    elif isinstance(doc, dict):
        width = max((len(k) for k in doc), default=0)
        for k, v in doc.items():
            shown = json.dumps(v) if isinstance(v, dict | list) else _cell(v, k)
            click.echo(f"{k:<{width}}  {shown}")
    else:
        click.echo(str(doc))


def table(items: list[dict[str, Any]], columns: list[str]) -> None:
    if not items:
        click.echo("(none)", err=not sys.stdout.isatty())
        return
    rows = [[_cell(item.get(c), c) for c in columns] for item in items]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any, column: str = "") -> str:
    """People read times as UTC dates; ``--json`` keeps the Unix seconds for scripts."""
    if value is None:
        return "-"
    if column.endswith(("_at", "not_before")) and isinstance(value, int) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value)) if value > 0 else "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)
