"""Who may do what: the three API-key roles and the groups the routes admit.

One list, read by the key store (what a key may be created with), the REST blueprints
(``require(*WRITERS)``), the OpenAPI document and the CLI's ``--role`` choices, so a role is
added or renamed in one place.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"        # everything, including API keys and server key rotation
    OPERATOR = "operator"  # machines, models, licenses; reads everything but the audit trail
    AUDITOR = "auditor"    # reads everything and the audit trail; writes nothing


READERS = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR)
WRITERS = (Role.ADMIN, Role.OPERATOR)
AUDITORS = (Role.ADMIN, Role.AUDITOR)
ADMINS = (Role.ADMIN,)


def describe(roles: tuple[Role, ...]) -> str:
    """``"admin, operator"``: how the OpenAPI document and errors name a group."""
    return ", ".join(roles)
