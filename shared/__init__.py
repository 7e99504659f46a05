"""Everything the license server and the verifier must agree on byte for byte.

The lock format (:mod:`shared.lockfile`), the machine code (:mod:`shared.machine`), the
license token (:mod:`shared.tokens`), key wrapping (:mod:`shared.wrap`), the enrollment code
(:mod:`shared.enrollment`), the signed activation request (:mod:`shared.activation`) and the
error types (:mod:`shared.errors`).
"""

__version__ = "0.1.0"
