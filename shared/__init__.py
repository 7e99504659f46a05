"""Everything the license server and the verifier must agree on byte for byte.

The lock format (:mod:`layerlock.shared.lockfile`), the machine code (:mod:`layerlock.shared.machine`), the
license token (:mod:`layerlock.shared.tokens`), key wrapping (:mod:`layerlock.shared.wrap`), the enrollment code
(:mod:`layerlock.shared.enrollment`), the signed activation request (:mod:`layerlock.shared.activation`) and the
error types (:mod:`layerlock.shared.errors`).
"""

__version__ = "0.1.0"
