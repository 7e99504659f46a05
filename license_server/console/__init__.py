"""The ops console: server-rendered pages under ``/console/`` for machines, licenses, models,
the audit trail and API keys — Flask + Jinja, one stylesheet, progressive enhancement only.

* Sign-in with an API key; the session lives in Redis (:mod:`.sessions`), the cookie is
  ``Secure; HttpOnly; SameSite=Strict``; every form carries a CSRF token.
* Reads come from the store's public functions; every write (and each audit read whose
  answer must be the REST API's) runs the REST endpoint's own function (:mod:`.ops`), so
  roles, validation and audit records are exactly the REST API's.
* A Content-Security-Policy without inline scripts or styles; Jinja escapes all output.
"""

from layerlock.license_server.console.views import bp

__all__ = ["bp"]
