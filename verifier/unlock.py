"""From a token to a model in memory: accept the token, open ``wk``, restore into a memfd.

:func:`accept_token` is the single gate every token passes — fresh from the server or read from
the cache: pinned keys and EdDSA only, iss/aud, ``sub`` = our machine code, ``mdl`` = the model,
nbf/exp with leeway (all in :func:`layerlock.shared.tokens.verify_token`), and then ``wk`` must open with our
own X25519 (or hybrid) key under the (license, machine, model) binding.  A token that passes
all of that could only have been issued to this machine for this model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric import ed25519

# the narrow modules: restore needs neither numpy nor the protect machinery (start-up time)
from layerlock.shared.bundle import read_header
from layerlock.shared.errors import LockedFileMismatch, UnsupportedModel, WrapError
from layerlock.shared.ncnnfile import container_head, read_param
from layerlock.shared.restore import restore_to, write_fingerprint
from layerlock.shared.tokens import LicenseClaims, verify_token
from layerlock.shared.wrap import MachineKemKeys, binding_info, open_sealed
from layerlock.verifier.memory import SealedModel


def accept_token(token: str, *, keys: Mapping[str, ed25519.Ed25519PublicKey], kem: MachineKemKeys,
                 machine_code: str, model_id: str, issuer: str, leeway: int,
                 now: float | None = None) -> tuple[LicenseClaims, bytes]:
    """Verify ``token`` and open ``wk``; raise TokenError / WrapError otherwise.

    Returns the opened ``wk``: the 256-bit data key, then -- for a fingerprinted model -- this
    license's values at the bundle's fingerprint positions (:func:`restore_model` splits them)."""
    claims = verify_token(token, keys, machine_code=machine_code, model_id=model_id, issuer=issuer,
                          leeway=leeway, now=now)
    unlock = open_sealed(claims.wrapped_key, kem.private_for(claims.suite), claims.suite,
                         binding_info(claims.lic, machine_code, model_id))
    if len(unlock) < 32:
        raise WrapError("wrapped key is not a 256-bit data key")
    return claims, unlock


def restore_model(model_id: str, locked: Path, bundle: Path, unlock: bytes,
                  param: Path | None = None) -> SealedModel:
    """Restore the model bytes straight into a sealed memfd (never onto disk).

    ``unlock`` is the opened ``wk``: the data key, then the license's fingerprint values, which
    are written over the decoys at the bundle's fingerprint positions -- so what is served is
    the license's own copy (:mod:`layerlock.shared.fingerprint`).  A bundle with fingerprint
    positions and a ``wk`` without exactly its values (or the reverse) is refused.

    An ncnn model is served as one container, its ``.param`` (``param``, default: the locked
    ``.bin``'s name with ``.param``) and the unlocked ``.bin`` (PROTOCOL.md, "ncnn models"); the
    ``.param`` must be the one the bundle binds.
    """
    header = read_header(bundle)
    if header.model_id != model_id:
        raise WrapError(f"bundle {bundle} belongs to model {header.model_id!r}, not {model_id!r}")
    data_key, values = unlock[:32], unlock[32:]
    if len(values) != header.fingerprint_bytes:
        raise WrapError(f"the token carries {len(values)} bytes of fingerprint values; bundle {Path(bundle).name} "
                        f"needs {header.fingerprint_bytes} (a token for another protect run of this model?)")
    head = b""
    if header.format == "ncnn":
        head = container_head(_ncnn_param(model_id, Path(locked), param, header.param_digest), header.locked_size)

    def fill(out: BinaryIO) -> None:
        view = memoryview(head)
        while len(view):  # a raw write may be short
            view = view[out.write(view) or 0:]
        start = out.tell()
        restore_to(locked, bundle, data_key, out)
        if values:
            write_fingerprint(out, start, header, values)

    return SealedModel(model_id, header.format, fill)


def _ncnn_param(model_id: str, locked: Path, param: Path | None, digest: str | None) -> bytes:
    path = param if param is not None else locked.with_suffix(".param")
    try:
        data = read_param(path)
    except OSError as exc:
        raise LockedFileMismatch(f"cannot read the .param of ncnn model {model_id} ({path}): {exc.strerror}") from None
    except UnsupportedModel as exc:
        raise LockedFileMismatch(exc.message) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise LockedFileMismatch(f"{path.name} is not the .param ncnn model {model_id} was protected with")
    return data
