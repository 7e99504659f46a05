"""The model id rule, once: what a model may be called everywhere an id crosses a boundary
(REST bodies, activation requests, bundle headers, sidecar config, token-cache file names).

1-128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit:
safe as a file name (no ``/``, no leading dot), as a Redis key part and in a URL path.  Matched
against the *whole* string (``fullmatch``: a trailing newline does not slip through).
"""

from __future__ import annotations

import re
from typing import Any

from layerlock.shared.errors import InvalidInput

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RULE = "1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and _MODEL_ID.fullmatch(value) is not None


def check_model_id(value: Any, *, field: str = "model") -> str:
    """``value`` if it is a model id, else :class:`InvalidInput` naming ``field``."""
    if not is_model_id(value):
        raise InvalidInput(f"{field} must be {RULE}")
    return str(value)
