"""The console's one door into the REST layer: every write is the REST endpoint's own function.

The blueprints under ``api/`` hold, for each operation, the validation, the store calls (state
and audit record in one commit), the retries and the metrics.  The console does not re-implement
any of it: :func:`call` runs the REST view function itself — found by its endpoint name,
unwrapped from its ``require`` decorator (``inspect.unwrap``) — in a nested request that carries
the same JSON body the CLI would send, with ``g.actor``/``g.role`` set from the console session
as ``require`` sets them from the bearer key.  So a write from the console and one from
``curl`` produce the same record, audited with the same key id; only authentication differs
(a session cookie instead of ``Authorization``).

Roles: :data:`ACTIONS` states which roles each REST endpoint admits (the same tuples the REST
layer uses; ``tests/license_server/test_console.py`` checks every entry against the live REST
API for every role).  :func:`call` refuses anything else, so a forged form is refused whatever
the templates show.  Keep this module small: it is the single place to adjust when the REST
layer changes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, cast

from flask import current_app, g, request, url_for
from werkzeug.test import EnvironBuilder

from layerlock.license_server.roles import ADMINS, AUDITORS, READERS, WRITERS
from layerlock.shared.errors import Forbidden

#: Pages: who may see them (writes on them are further gated per action).
PAGES: dict[str, tuple[str, ...]] = {
    "dashboard": tuple(READERS), "machines": tuple(READERS), "licenses": tuple(READERS),
    "models": tuple(READERS), "audit": tuple(AUDITORS), "keys": tuple(ADMINS),
}


@dataclass(frozen=True)
class Action:
    endpoint: str  # the REST view's Flask endpoint
    roles: tuple[str, ...]  # the roles its ``require`` admits


ACTIONS: dict[str, Action] = {
    "machine.register": Action("machines.register", tuple(WRITERS)),
    "machine.deactivate": Action("machines.deactivate", tuple(WRITERS)),
    "machine.reactivate": Action("machines.reactivate", tuple(WRITERS)),
    "license.issue": Action("licenses.issue", tuple(WRITERS)),
    "license.extend": Action("licenses.extend", tuple(WRITERS)),
    "license.revoke": Action("licenses.revoke", tuple(WRITERS)),
    "model.retire": Action("models.retire", tuple(WRITERS)),
    "key.create": Action("keys.create", tuple(ADMINS)),
    "key.revoke": Action("keys.revoke", tuple(ADMINS)),
    # audit reads whose answer must be the REST API's (filters, verdicts, signed checkpoints)
    "audit.list": Action("audit.list_records", tuple(AUDITORS)),
    "audit.verify": Action("audit.verify", tuple(AUDITORS)),
    "audit.checkpoint": Action("audit.checkpoint", tuple(AUDITORS)),
    "audit.checkpoints": Action("audit.stored_checkpoints", tuple(AUDITORS)),
    "audit.rejections": Action("audit.rejections_summary", tuple(AUDITORS)),
}


def may(action: str, role: str | None = None) -> bool:
    """May ``role`` (default: the signed-in one) do ``action`` (an :data:`ACTIONS` key or a page)?"""
    role = g.get("role") if role is None else role
    roles = ACTIONS[action].roles if action in ACTIONS else PAGES[action]
    return role in roles


def call(action: str, *, args: dict[str, str] | None = None, json: dict[str, Any] | None = None,
         query: dict[str, str] | None = None) -> Any:
    """Run the REST endpoint of ``action`` as the signed-in key; its JSON answer (a dict).

    Raises what the REST view raises (``InvalidInput``, ``Conflict``, ``NotFound``, …) and
    ``Forbidden`` when the session's role may not do it."""
    act = ACTIONS[action]
    actor, role = g.actor, g.role
    if role not in act.roles:
        raise Forbidden(f"role {role} may not do this (needs {' or '.join(act.roles)})")
    rule = next(current_app.url_map.iter_rules(act.endpoint))
    method = next(m for m in sorted(rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
    path = url_for(act.endpoint, **cast(dict[str, Any], args or {}))[len(request.script_root):]
    headers = [(k, request.headers[k]) for k in ("X-Forwarded-For", "User-Agent") if k in request.headers]
    builder = EnvironBuilder(path=path, method=method, query_string=query, headers=headers,
                             json=(json or {}) if method != "GET" else None,
                             environ_base={"REMOTE_ADDR": request.remote_addr or ""})
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    view = inspect.unwrap(current_app.view_functions[act.endpoint])
    with current_app.request_context(environ):
        g.actor, g.role = actor, role  # what ``require`` sets from the bearer key
        result = view(**(args or {}))
    return result[0] if isinstance(result, tuple) else result
